//! Loading Vulkan, listing adapters, and choosing one.

use std::ffi::CStr;

use ash::vk;

use super::conv::{self, error};
use crate::config::DeviceType;
use crate::error::{EngineError, Result};

/// The loaded Vulkan library and an instance of it.
pub(crate) struct Instance {
    _entry: ash::Entry,
    pub(crate) instance: ash::Instance,
}

/// A physical device that hetmem can use.
#[derive(Clone)]
pub(crate) struct Adapter {
    pub(crate) physical: vk::PhysicalDevice,
    pub(crate) name: String,
    pub(crate) device_type: DeviceType,
    pub(crate) host_import: bool,
}

impl Instance {
    /// Loads the Vulkan loader and creates an instance (Vulkan 1.2 or later).
    pub(crate) fn new() -> Result<Instance> {
        // SAFETY: loading the system's Vulkan loader runs its initialisers, which is what the
        // loader is for; no Vulkan object exists yet.
        let entry = unsafe { ash::Entry::load() }.map_err(|e| EngineError::NoDevice {
            wanted: "vulkan".into(),
            reason: format!("no Vulkan loader: {e}"),
        })?;
        let app = vk::ApplicationInfo::default()
            .application_name(c"hetmem")
            .engine_name(c"hetmem")
            .api_version(vk::API_VERSION_1_2);
        let info = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: `info` and what it points to live across the call.
        let instance =
            unsafe { entry.create_instance(&info, None) }.map_err(|e| EngineError::NoDevice {
                wanted: "vulkan".into(),
                reason: format!("vkCreateInstance: {e}"),
            })?;
        Ok(Instance {
            _entry: entry,
            instance,
        })
    }

    /// Physical devices with Vulkan 1.2 and timeline semaphores.
    pub(crate) fn adapters(&self) -> Result<Vec<Adapter>> {
        // SAFETY: the instance is live.
        let pds = unsafe { self.instance.enumerate_physical_devices() }
            .map_err(|e| error("vkEnumeratePhysicalDevices", e))?;
        let mut out = Vec::new();
        for pd in pds {
            // SAFETY: `pd` came from this instance.
            let props = unsafe { self.instance.get_physical_device_properties(pd) };
            if vk::api_version_minor(props.api_version) < 2
                && vk::api_version_major(props.api_version) == 1
            {
                continue;
            }
            let name = props
                .device_name_as_c_str()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unnamed".into());
            // SAFETY: `pd` came from this instance.
            let exts = unsafe { self.instance.enumerate_device_extension_properties(pd) }
                .unwrap_or_default();
            let has = |n: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(n));
            let device_type = conv::device_type(props.device_type);
            out.push(Adapter {
                physical: pd,
                name,
                device_type,
                host_import: has(ash::ext::external_memory_host::NAME),
            });
        }
        Ok(out)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: every child object was destroyed before the instance (the context drops
        // its device first).
        unsafe { self.instance.destroy_instance(None) };
    }
}

/// Picks an adapter: by name substring if given, else discrete, integrated, virtual, CPU, other.
pub(crate) fn choose(adapters: &[Adapter], wanted: Option<&str>) -> Result<(Adapter, String)> {
    let rank = |t: DeviceType| match t {
        DeviceType::Discrete => 0,
        DeviceType::Integrated => 1,
        DeviceType::Virtual => 2,
        DeviceType::Cpu => 3,
        _ => 4,
    };
    let names = adapters
        .iter()
        .map(|a| a.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let candidates: Vec<&Adapter> = match wanted {
        Some(w) => {
            let w = w.to_lowercase();
            adapters
                .iter()
                .filter(|a| a.name.to_lowercase().contains(&w))
                .collect()
        }
        None => adapters.iter().collect(),
    };
    let best = candidates
        .into_iter()
        .min_by_key(|a| rank(a.device_type))
        .ok_or_else(|| EngineError::NoDevice {
            wanted: "vulkan".into(),
            reason: match wanted {
                Some(w) => format!("no adapter name contains {w:?} (found: {names})"),
                None => "no Vulkan 1.2 device".into(),
            },
        })?;
    let why = match wanted {
        Some(w) => format!("HETMEM_ADAPTER matched {w:?} among [{names}]"),
        None => format!("{:?} ranks first among [{names}]", best.device_type),
    };
    Ok((best.clone(), why))
}
