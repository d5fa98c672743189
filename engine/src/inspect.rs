//! Inspection of a user kernel against hetmem's binding layout and the device's limits,
//! after parsing and before validation, SPIR-V or any pipeline: a kernel that declares
//! resources of its own, reaches the helper's bindings or internal functions directly, or
//! asks for more workgroup memory or a larger workgroup than the device has is refused here,
//! with its line, instead of reaching the driver (where some of them crash or compile for
//! minutes).

use std::ops::Range;

use naga::{
    AddressSpace, Block, Expression, Function, Handle, Module, Span, Statement, Type, TypeInner,
};

/// The helper's functions whose names start with this are its internals: raw access to
/// device memory, without the bounds checks the public `hm_` functions make.
pub(crate) const INTERNAL_PREFIX: &str = "hm__";

/// The helper's translated-page handle: its fields name device memory directly, so only the
/// helper may make one, and no kernel may keep one where it can change it.
const PAGE_HANDLE: &str = "HmPage";

/// What the device allows one kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KernelLimits {
    /// Storage bindings a kernel may have beyond the helper's fixed ones (chunks).
    pub(crate) max_chunks: u32,
    /// The largest storage binding, in bytes.
    pub(crate) max_binding_bytes: u64,
    /// Workgroup (shared) memory, in bytes (`maxComputeSharedMemorySize`).
    pub(crate) workgroup_memory: u64,
    /// Largest workgroup per dimension (`maxComputeWorkGroupSize`).
    pub(crate) workgroup_size: [u32; 3],
    /// Most invocations in one workgroup (`maxComputeWorkGroupInvocations`).
    pub(crate) workgroup_invocations: u32,
}

/// Why a kernel was refused before it was compiled. Lines count from the first line of the
/// kernel's own source.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KernelRejection {
    /// The kernel declares a resource (a binding, a push constant) of its own: hetmem binds
    /// group 0 itself and kernels reach memory only through the helper.
    #[error("line {line}: `{name}` declares a resource of its own ({what}); kernels reach memory only through hetmem's helper (hm_ptr, hm_load, hm_store, hm_page)")]
    OwnResource {
        /// The variable.
        name: String,
        /// Its address space and binding, as declared.
        what: String,
        /// Its line.
        line: u32,
    },
    /// The kernel uses one of the helper's bindings or internal functions directly.
    #[error("line {line}: `{name}` is internal to hetmem's helper; use the hm_ functions")]
    HelperInternals {
        /// The binding or function used.
        name: String,
        /// The line of the use.
        line: u32,
    },
    /// The kernel's `var<workgroup>` variables need more memory than the device has.
    #[error("workgroup variables of {} bytes exceed the device's {limit} bytes of shared memory", bytes.map_or("too many".to_string(), |b| b.to_string()))]
    WorkgroupMemory {
        /// Bytes the kernel declares (`None`: too large to count).
        bytes: Option<u64>,
        /// The device's limit.
        limit: u64,
    },
    /// The entry point's workgroup is larger than the device allows.
    #[error("workgroup size {size:?} exceeds the device's limits: at most {max:?} per dimension and {max_invocations} invocations")]
    WorkgroupSize {
        /// The entry point's `@workgroup_size`.
        size: [u32; 3],
        /// The device's largest size per dimension.
        max: [u32; 3],
        /// The device's most invocations per workgroup.
        max_invocations: u32,
    },
    /// The kernel builds an `HmPage` itself (in a function or a module-scope `const`), or
    /// keeps one where it can change it (a `var`): its fields name device memory directly,
    /// so only `hm_page` may make one.
    #[error("line {line}: an HmPage may only come from hm_page() and be kept in a `let`")]
    PageHandle {
        /// The line of the construction or the variable.
        line: u32,
    },
    /// The entry point's workgroup size depends on pipeline overrides, which hetmem never
    /// sets.
    #[error("the workgroup size of `{0}` depends on overrides: give it as constants")]
    OverriddenWorkgroupSize(String),
}

/// The source a module was parsed from and where the user's part of it lies.
pub(crate) struct Origin<'a> {
    /// The whole source (the user's kernel and the helper).
    pub(crate) source: &'a str,
    /// Bytes of `source` that are the user's.
    pub(crate) user: Range<usize>,
}

impl Origin<'_> {
    fn is_user(&self, span: Span) -> bool {
        span.to_range()
            .is_some_and(|r| self.user.contains(&r.start))
    }

    /// The user's line of a byte offset in the source (1 for anything before the user's
    /// part).
    pub(crate) fn line(&self, offset: usize) -> u32 {
        let end = offset.clamp(self.user.start, self.source.len());
        self.source[self.user.start..end].matches('\n').count() as u32 + 1
    }

    fn span_line(&self, span: Span) -> u32 {
        span.to_range().map_or(0, |r| self.line(r.start))
    }
}

/// Checks the module of a kernel (`entry` exists) against hetmem's layout and `limits`.
pub(crate) fn inspect(
    module: &Module,
    origin: &Origin<'_>,
    entry: &str,
    limits: &KernelLimits,
) -> Result<(), KernelRejection> {
    let page = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(PAGE_HANDLE))
        .map(|(h, _)| h);
    let holds_page = |ty| page.is_some_and(|p| contains(module, ty, p));
    refuse_module_scope_pages(module, origin, page)?;
    let mut shared: Option<u64> = Some(0);
    for (h, g) in module.global_variables.iter() {
        let span = module.global_variables.get_span(h);
        if !origin.is_user(span) {
            continue;
        }
        if holds_page(g.ty) {
            return Err(KernelRejection::PageHandle {
                line: origin.span_line(span),
            });
        }
        let name = g.name.clone().unwrap_or_default();
        let what = match (g.space, &g.binding) {
            (AddressSpace::Private | AddressSpace::Function, None) => continue,
            (AddressSpace::WorkGroup, None) => {
                let bytes = module.types[g.ty].inner.try_size(module.to_ctx());
                shared = shared.zip(bytes).map(|(s, b)| s + u64::from(b));
                continue;
            }
            (space, Some(b)) => format!("{space:?} at @group({}) @binding({})", b.group, b.binding),
            (space, None) => format!("{space:?}"),
        };
        return Err(KernelRejection::OwnResource {
            name,
            what,
            line: origin.span_line(span),
        });
    }
    if shared.is_none_or(|s| s > limits.workgroup_memory) {
        return Err(KernelRejection::WorkgroupMemory {
            bytes: shared,
            limit: limits.workgroup_memory,
        });
    }
    let Some(ep) = module.entry_points.iter().find(|e| e.name == entry) else {
        // Reported by the SPIR-V step, which names the entry point it looked for.
        return Ok(());
    };
    if ep
        .workgroup_size_overrides
        .is_some_and(|o| o.iter().any(Option::is_some))
    {
        return Err(KernelRejection::OverriddenWorkgroupSize(entry.to_string()));
    }
    check_workgroup_size(ep.workgroup_size, limits)?;
    let user_functions = module
        .functions
        .iter()
        .filter(|&(h, _)| origin.is_user(module.functions.get_span(h)))
        .map(|(_, f)| f);
    for f in user_functions.chain(module.entry_points.iter().map(|e| &e.function)) {
        check_function(module, origin, f)?;
        if let Some(p) = page {
            check_page_handles(module, origin, f, p)?;
        }
    }
    Ok(())
}

/// A module-scope `const` holding an HmPage is built outside any function (its constructor
/// lives among the module's expressions): refused like one built inside.
fn refuse_module_scope_pages(
    module: &Module,
    origin: &Origin<'_>,
    page: Option<Handle<Type>>,
) -> Result<(), KernelRejection> {
    let Some(p) = page else {
        return Ok(());
    };
    for (h, c) in module.constants.iter() {
        if contains(module, c.ty, p) {
            return Err(KernelRejection::PageHandle {
                line: origin.span_line(module.constants.get_span(h)),
            });
        }
    }
    for (h, e) in module.global_expressions.iter() {
        if matches!(*e, Expression::Compose { ty, .. } if ty == p) {
            return Err(KernelRejection::PageHandle {
                line: origin.span_line(module.global_expressions.get_span(h)),
            });
        }
    }
    Ok(())
}

/// The entry point's workgroup size against the device's limits.
fn check_workgroup_size(size: [u32; 3], limits: &KernelLimits) -> Result<(), KernelRejection> {
    let invocations: u64 = size.iter().map(|&d| u64::from(d)).product();
    if size.iter().zip(limits.workgroup_size).any(|(&d, m)| d > m)
        || invocations > u64::from(limits.workgroup_invocations)
    {
        return Err(KernelRejection::WorkgroupSize {
            size,
            max: limits.workgroup_size,
            max_invocations: limits.workgroup_invocations,
        });
    }
    Ok(())
}

/// True if `ty` is `target` or holds one (in an array, a struct, behind a pointer).
fn contains(module: &Module, ty: Handle<Type>, target: Handle<Type>) -> bool {
    if ty == target {
        return true;
    }
    match module.types[ty].inner {
        TypeInner::Array { base, .. }
        | TypeInner::BindingArray { base, .. }
        | TypeInner::Pointer { base, .. } => contains(module, base, target),
        TypeInner::Struct { ref members, .. } => {
            members.iter().any(|m| contains(module, m.ty, target))
        }
        _ => false,
    }
}

/// Refuses a user function that builds an `HmPage` or keeps one in a variable.
fn check_page_handles(
    module: &Module,
    origin: &Origin<'_>,
    f: &Function,
    page: Handle<Type>,
) -> Result<(), KernelRejection> {
    for (h, v) in f.local_variables.iter() {
        if contains(module, v.ty, page) {
            return Err(KernelRejection::PageHandle {
                line: origin.span_line(f.local_variables.get_span(h)),
            });
        }
    }
    for (h, e) in f.expressions.iter() {
        if matches!(*e, Expression::Compose { ty, .. } if ty == page) {
            return Err(KernelRejection::PageHandle {
                line: origin.span_line(f.expressions.get_span(h)),
            });
        }
    }
    Ok(())
}

/// Refuses a user function that names a helper binding or calls a helper internal.
fn check_function(
    module: &Module,
    origin: &Origin<'_>,
    f: &Function,
) -> Result<(), KernelRejection> {
    for (h, e) in f.expressions.iter() {
        let name = match *e {
            Expression::GlobalVariable(g)
                if !origin.is_user(module.global_variables.get_span(g)) =>
            {
                module.global_variables[g].name.clone()
            }
            Expression::CallResult(callee) => internal(module, callee),
            _ => None,
        };
        if let Some(name) = name {
            return Err(KernelRejection::HelperInternals {
                name,
                line: origin.span_line(f.expressions.get_span(h)),
            });
        }
    }
    check_block(module, origin, &f.body)
}

fn check_block(module: &Module, origin: &Origin<'_>, block: &Block) -> Result<(), KernelRejection> {
    for (s, span) in block.span_iter() {
        match s {
            Statement::Call { function, .. } => {
                if let Some(name) = internal(module, *function) {
                    return Err(KernelRejection::HelperInternals {
                        name,
                        line: origin.span_line(*span),
                    });
                }
            }
            Statement::Block(b) => check_block(module, origin, b)?,
            Statement::If { accept, reject, .. } => {
                check_block(module, origin, accept)?;
                check_block(module, origin, reject)?;
            }
            Statement::Switch { cases, .. } => {
                for c in cases {
                    check_block(module, origin, &c.body)?;
                }
            }
            Statement::Loop {
                body, continuing, ..
            } => {
                check_block(module, origin, body)?;
                check_block(module, origin, continuing)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The name of `f` if it is one of the helper's internals.
fn internal(module: &Module, f: Handle<Function>) -> Option<String> {
    module.functions[f]
        .name
        .clone()
        .filter(|n| n.starts_with(INTERNAL_PREFIX))
}
