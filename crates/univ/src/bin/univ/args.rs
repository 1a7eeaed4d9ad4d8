//! Arguments shared by several subcommands.

use anyhow::{Context, Result};
use candle_core::Device;

/// Where the work runs.
#[derive(clap::Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The device the network runs on: `cpu`, `cuda` (the first GPU) or `cuda:N` (a build
    /// with `--features cuda`).
    /// [default: cpu; for `train`, the configuration's `train.device`]
    #[arg(long)]
    pub device: Option<DeviceArg>,
    /// Arithmetic of the convolutions: f32 (the default, within the parity tolerances of the
    /// official code) or bf16 (operands rounded to bfloat16, sums in f32: on CPUs with
    /// AMX-BF16, or AVX512-BF16 where it is faster than f32, as on AMD Zen 4 and 5; elsewhere
    /// f32 is used and a warning printed, `UNIV_BF16_KERNEL=avx512bf16` forcing the
    /// AVX512-BF16 kernel). On a GPU: f32, bf16 or f16, cuDNN's convolutions taking their
    /// operands in that type with f32 sums (norms, activations, the head and the logits stay
    /// f32).
    /// [default: f32; bf16 with `segment --fast`]
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// 3×3×3 convolutions by Winograd's F(2,3) where it pays off (`on`, the default; in bf16
    /// only the largest layers) or by the direct kernel everywhere (`off`). In bf16 on
    /// AVX512-BF16, `off` takes about three quarters of the rounding error against f32 and
    /// about 1.45× the time (see the README); in f32 both are within the parity tolerances.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub winograd: Switch,
}

/// On or off.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// A precision choice.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    /// f32 throughout.
    F32,
    /// bf16 convolutions (on a CPU: between layers of 16 channels or more).
    Bf16,
    /// f16 convolutions (a GPU only).
    F16,
}

/// A device choice: `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// The CPU.
    Cpu,
    /// The CUDA GPU of this ordinal (a build with `--features cuda`).
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Ok(DeviceArg::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceArg::Cuda(n)),
                _ => Err(format!(
                    "{s:?}: expected cpu, cuda or cuda:N (N the GPU's ordinal)"
                )),
            },
        }
    }
}

/// An error with the exit code it must end the program with.
#[derive(Debug)]
pub struct CodedError {
    /// The exit code.
    pub code: u8,
    /// What went wrong.
    pub error: anyhow::Error,
}

impl CodedError {
    /// `error`, ending the program with `code`.
    pub fn new(code: u8, error: anyhow::Error) -> Self {
        CodedError { code, error }
    }
}

impl std::fmt::Display for CodedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for CodedError {}

/// The most worker threads accepted, as a multiple of the machine's cores.
const MAX_THREADS_PER_CORE: usize = 4;

impl RuntimeArgs {
    /// The thread count, checked: at least 1 and at most 4× the cores. Without `--threads`,
    /// a Slurm task's `SLURM_CPUS_PER_TASK` (Slurm does not always pin a task to its CPUs, so
    /// every core would otherwise be used by every task), or the cores divided by
    /// `LOCAL_WORLD_SIZE` for one of several ranks a torchrun-style launcher started on this
    /// machine; else `None` (every core the process may use, which follows CPU affinity and
    /// container CPU limits).
    pub fn threads(&self) -> Result<Option<usize>> {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let var = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n > 0)
        };
        let Some(n) = self.threads else {
            // A torchrun-style launch of several ranks on this machine shares its cores.
            return Ok(var("SLURM_CPUS_PER_TASK").or_else(|| {
                var("LOCAL_WORLD_SIZE")
                    .filter(|w| *w > 1)
                    .map(|w| (cores / w).max(1))
            }));
        };
        let max = MAX_THREADS_PER_CORE * cores;
        if n == 0 || n > max {
            anyhow::bail!(
                "--threads {n}: give 1 to {max} (4 × the {cores} cores of this machine); leave \
                 it out to use every core"
            );
        }
        Ok(Some(n))
    }

    /// Sets the precision of the CPU convolutions (`--precision`, else `default`) and their
    /// algorithm (`--winograd`), warning on stderr when bf16 was asked for and this CPU has no
    /// bf16 instructions (f32 is used then).
    /// On a GPU it sets the dtype of cuDNN's convolution operands instead, and the CPU stays
    /// in f32.
    pub fn apply_precision(&self, default: PrecisionArg) -> Result<()> {
        use univ::model::runtime::{Precision, set_gpu_conv_dtype, set_precision};
        let arg = self.precision.unwrap_or(default);
        if let Some(DeviceArg::Cuda(_)) = self.device {
            set_gpu_conv_dtype(match arg {
                PrecisionArg::F32 => candle_core::DType::F32,
                PrecisionArg::Bf16 => candle_core::DType::BF16,
                PrecisionArg::F16 => candle_core::DType::F16,
            })?;
            univ::model::runtime::set_winograd(self.winograd == Switch::On);
            set_precision(Precision::F32)?;
            return Ok(());
        }
        let precision = match arg {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::F16 => anyhow::bail!(
                "--precision f16 runs on a GPU only (--device cuda); on a CPU use bf16"
            ),
        };
        univ::model::runtime::set_winograd(self.winograd == Switch::On);
        let kernel = set_precision(precision)?;
        if precision == Precision::Bf16 && kernel.is_none() {
            eprintln!(
                "warning: bf16 (--precision bf16 or --fast): no bf16 kernel faster than f32 here \
                 ({}), so the convolutions run in f32; UNIV_BF16_KERNEL=reference forces bf16 \
                 arithmetic",
                univ::model::runtime::bf16_fallback_reason()
            );
        }
        Ok(())
    }

    /// The candle device.
    pub fn device(&self) -> Result<Device> {
        match self.device.unwrap_or(DeviceArg::Cpu) {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(n) => Device::new_cuda(n).with_context(|| {
                format!(
                    "no CUDA device {n}: this build needs `--features cuda`, a GPU and its \
                     driver (libcuda.so.1) and libraries (cuBLAS, cuRAND, cuDNN 9) on the \
                     library path"
                )
            }),
        }
    }
}

/// Limits on what an input may make the program allocate.
#[derive(clap::Args, Clone, Debug)]
pub struct LimitArgs {
    /// Most voxels of any grid read or made (the input, the resampled grid, ...).
    #[arg(long, default_value_t = univ::io::Limits::default().max_voxels)]
    pub max_voxels: u64,
    /// Most memory for the voxels of any one grid, in GB (10⁹ bytes).
    #[arg(long, default_value_t = univ::io::Limits::default().max_alloc as f64 / 1e9)]
    pub max_memory_gb: f64,
}

impl LimitArgs {
    /// The limits.
    pub fn limits(&self) -> Result<univ::io::Limits> {
        if !(self.max_memory_gb.is_finite() && self.max_memory_gb > 0.0) || self.max_voxels == 0 {
            anyhow::bail!("--max-voxels and --max-memory-gb must be positive");
        }
        Ok(univ::io::Limits {
            max_voxels: self.max_voxels,
            max_alloc: (self.max_memory_gb * 1e9) as u64,
        })
    }
}

/// How a DICOM series is read.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DicomArgs {
    /// The Series Instance UID to read when a DICOM folder holds several series.
    #[arg(long)]
    pub series: Option<String>,
    /// Accept a gantry tilt (slices shifted sideways); the affine then has a shear.
    #[arg(long)]
    pub allow_tilt: bool,
    /// Leave out DICOM files that cannot be read (with a warning, kept in report.json) instead
    /// of refusing the series.
    #[arg(long)]
    pub skip_unreadable: bool,
}

impl DicomArgs {
    /// The reader options.
    pub fn options(&self) -> univ::io::dicom::DicomReadOptions {
        univ::io::dicom::DicomReadOptions {
            series: self.series.clone(),
            allow_tilt: self.allow_tilt,
            skip_unreadable: self.skip_unreadable,
            ..Default::default()
        }
    }
}

/// A progress bar on stderr, drawn only on a terminal.
pub struct Progress {
    label: String,
    on: bool,
}

impl Progress {
    /// A bar for `label`, drawn when stderr is a terminal and `quiet` is off.
    pub fn new(label: impl Into<String>, quiet: bool) -> Self {
        Progress {
            label: label.into(),
            on: std::io::IsTerminal::is_terminal(&std::io::stderr()) && !quiet,
        }
    }

    /// Draws `done` of `total` `unit`.
    pub fn draw(&self, done: usize, total: usize, unit: &str) {
        if !self.on {
            return;
        }
        let w = 30;
        let f = done * w / total.max(1);
        eprint!(
            "\r{}: [{}{}] {done}/{total} {unit}",
            self.label,
            "#".repeat(f),
            " ".repeat(w - f)
        );
        if done == total {
            eprintln!();
        }
    }
}
