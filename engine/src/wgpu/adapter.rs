//! Opening the backend: choosing a wgpu adapter, requesting its device with error and
//! device-lost callbacks, and the [`DeviceInfo`] that says what was chosen and why.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::{gather, WgpuBackend};
use crate::backend::Backend;
use crate::config::{DeviceConfig, DeviceInfo, DeviceKind, DeviceType, GatherMode, HostAccess};
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;

/// Opens the wgpu adapter `config` selects (by name substring, else high performance).
pub(crate) fn open(
    config: &DeviceConfig,
    frames: &Arc<HostFramePool>,
) -> Result<(DeviceInfo, Box<dyn Backend>)> {
    let no_device = |reason: String| EngineError::NoDevice {
        wanted: "wgpu".into(),
        reason,
    };
    let (adapter, names) = choose(config)?;
    let ainfo = adapter.get_info();
    let limits = adapter.limits();
    let desc = wgpu::DeviceDescriptor {
        label: Some("hetmem"),
        required_features: wgpu::Features::empty(),
        required_limits: limits.clone(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&desc))
        .map_err(|e| no_device(format!("request_device: {e}")))?;
    let errors: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let sink = errors.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        tracing::error!("wgpu: {e}");
        sink.lock().get_or_insert_with(|| e.to_string());
    }));
    let lost = Arc::new(AtomicBool::new(false));
    let lost_flag = lost.clone();
    device.set_device_lost_callback(move |_, msg| {
        tracing::error!("wgpu device lost: {msg}");
        lost_flag.store(true, Ordering::Release);
    });
    let device_type = device_type(ainfo.device_type);
    let info = DeviceInfo {
        kind: DeviceKind::Wgpu,
        name: format!("{} ({:?})", ainfo.name, ainfo.backend),
        device_type,
        reason: match &config.adapter {
            Some(w) => format!("asked for wgpu; HETMEM_ADAPTER matched {w:?} among {names:?}"),
            None => format!("asked for wgpu; {device_type:?} ranks first among {names:?}"),
        },
        host_access: HostAccess::Staging,
        dedicated_transfer_queue: false,
        host_visible_memory: false,
    };
    let gather = (config.gather != GatherMode::Never).then(|| gather::Gather::new(&device));
    let backend = WgpuBackend {
        frames: frames.clone(),
        chunks: RwLock::new(Vec::new()),
        pending: Mutex::new(VecDeque::new()),
        next: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        max_binding: limits.max_storage_buffer_binding_size,
        gather,
        gather_mode: config.gather,
        cpu_device: device_type == DeviceType::Cpu,
        errors,
        lost,
        queue,
        device,
    };
    Ok((info, Box::new(backend)))
}

/// The adapter `config` names (by name substring), else the best ranked (discrete first,
/// Vulkan before other APIs), with the names of every adapter found.
fn choose(config: &DeviceConfig) -> Result<(wgpu::Adapter, Vec<String>)> {
    let no_device = |reason: String| EngineError::NoDevice {
        wanted: "wgpu".into(),
        reason,
    };
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
    let rank = |t: wgpu::DeviceType| match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let adapter = adapters
        .into_iter()
        .filter(|a| {
            config
                .adapter
                .as_ref()
                .is_none_or(|w| a.get_info().name.to_lowercase().contains(&w.to_lowercase()))
        })
        .min_by_key(|a| {
            (
                rank(a.get_info().device_type),
                a.get_info().backend != wgpu::Backend::Vulkan,
            )
        })
        .ok_or_else(|| no_device(format!("no wgpu adapter matches (found: {names:?})")))?;
    Ok((adapter, names))
}

/// What sort of hardware an adapter is, in hetmem's terms.
fn device_type(t: wgpu::DeviceType) -> DeviceType {
    match t {
        wgpu::DeviceType::DiscreteGpu => DeviceType::Discrete,
        wgpu::DeviceType::IntegratedGpu => DeviceType::Integrated,
        wgpu::DeviceType::VirtualGpu => DeviceType::Virtual,
        wgpu::DeviceType::Cpu => DeviceType::Cpu,
        wgpu::DeviceType::Other => DeviceType::Other,
    }
}
