//! Choosing the compute device once, at start-up.

use candle_core::Device;

use crate::error::{Error, Result};

/// The device a user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceChoice {
    /// The CPU (always available).
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            other => Err(Error::invalid(
                "device",
                format!("`{other}` (expected cpu or cuda)"),
            )),
        }
    }
}

/// The dtype the weights are held in, as a user names it (`f32`, `f16`, `bf16`); parsed once at
/// the edge (CLI flag, GUI setting), then passed around as this enum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WeightDtype {
    /// 32-bit float: what the analyses are specified in.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl WeightDtype {
    /// candle's dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::BF16 => candle_core::DType::BF16,
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            other => Err(Error::invalid(
                "dtype",
                format!("`{other}` (expected f32, f16 or bf16)"),
            )),
        }
    }
}

/// Opens the chosen device.
pub fn device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            if !cfg!(feature = "cuda") {
                return Err(Error::invalid(
                    "device",
                    "this build has no CUDA support; rebuild with `--features cuda`",
                ));
            }
            Device::new_cuda(0).map_err(|err| {
                Error::invalid("device", format!("cannot open CUDA device 0 ({err})"))
            })
        }
    }
}

/// Spin iterations of candle's element-wise worker pool before it parks. candle's default
/// (25,000) keeps its workers busy-waiting between ops, where they fight gemm's rayon workers for
/// the cores: on a 2-core machine that cost ~15% of a forward (365 → 310 ms at 128 tokens).
const BARRIER_POOL_SPIN_LIMIT: &str = "100";

/// Sets candle's CPU threading knobs to measured defaults, unless the user set them already:
/// `RAYON_NUM_THREADS` = all available cores (gemm scales ~1.5x from 1 to 2 cores here), and a
/// short spin limit for candle's element-wise pool. Call once at program start, before any
/// tensor operation and before other threads exist (candle reads these when its pools start).
pub fn configure_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", BARRIER_POOL_SPIN_LIMIT);
    }
    keep_freed_memory();
}

/// Keeps freed tensor buffers in the process instead of returning them to the kernel.
///
/// glibc serves large allocations with `mmap` and unmaps them on free, so every forward pass
/// page-faults its activations back in and the kernel zeroes each page: 10% of a 128-token
/// forward of the demo model. Raising the mmap and trim thresholds (to 1 GiB) lets the heap
/// reuse those buffers; RSS then stays near its peak, which is what a desktop app wants.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_freed_memory() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    const ONE_GIB: i32 = 1 << 30;
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: `mallopt` only changes allocator tuning parameters; it is called at start-up,
    // before other threads exist.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, ONE_GIB);
        mallopt(M_TRIM_THRESHOLD, ONE_GIB);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
