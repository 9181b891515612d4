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
            other => Err(Error::invalid("device", format!("`{other}` (expected cpu or cuda)"))),
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
            Device::new_cuda(0).map_err(|err| Error::invalid("device", format!("cannot open CUDA device 0 ({err})")))
        }
    }
}
