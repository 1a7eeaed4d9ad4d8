//! Data-parallel training, one process per device, started the way clusters start jobs.
//!
//! A run of `N` processes ("ranks") is configured by the environment that `torchrun` sets
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or that Slurm's `srun`
//! sets (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`; the job script exports
//! `MASTER_ADDR`, the first node of the allocation, and optionally `MASTER_PORT`)
//! ([`WorldEnv::from_env`]).
//!
//! Rank 0 listens on `MASTER_PORT`; the others connect to `MASTER_ADDR:MASTER_PORT`
//! ([`ProcessGroup::init`]). The collectives ([`ProcessGroup::all_reduce_sum`],
//! [`ProcessGroup::broadcast`]) then run
//! - on CUDA devices through NCCL (the `cuda` feature; rank 0 makes the NCCL id and hands it
//!   over that connection), in place on the GPU;
//! - elsewhere over the TCP connections themselves: every rank sends its values to rank 0,
//!   which adds them in rank order and sends the sums back (deterministic, and enough for the
//!   few megabytes of gradients of one step).
//!
//! What the trainer makes of it ([`crate::Trainer::set_process_group`]): with accumulation
//! `a`, step `s` consumes the global micro-batches `s·a·N .. (s+1)·a·N`, rank `r` those whose
//! index is `r` modulo `N`; each rank scales its loss by `1/(a·N)` and the gradients are
//! summed over the ranks. That is one process with accumulation `a·N` over the same
//! micro-batches, up to the order of the additions.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where this process stands in a distributed run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldEnv {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Processes in the run.
    pub world_size: usize,
    /// Rank among the processes of this machine: the GPU ordinal it uses.
    pub local_rank: usize,
    /// Host name or address of rank 0.
    pub master_addr: String,
    /// Port rank 0 listens on.
    pub master_port: u16,
}

/// `MASTER_PORT` when none is set (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// How long ranks wait for each other: to connect, and for any collective (rank 0 may be
/// validating or writing a checkpoint meanwhile). `UNIV_DIST_TIMEOUT` (seconds) overrides it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

fn env_error(reason: String) -> Error {
    Error::Distributed(reason)
}

impl WorldEnv {
    /// The run this process belongs to, from the process environment: `None` when it is not
    /// started as part of one (no `WORLD_SIZE`, and no Slurm job of more than one task).
    ///
    /// # Errors
    /// Values that are not numbers, a rank outside the world, a world of 0.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    env_error(format!("{k}={v:?} is not a non-negative whole number"))
                }),
            }
        };
        let (rank, world, local) = if let Some(world) = num("WORLD_SIZE")? {
            let rank = num("RANK")?
                .ok_or_else(|| env_error("WORLD_SIZE is set but RANK is not".into()))?;
            (rank, world, num("LOCAL_RANK")?.unwrap_or(rank))
        } else {
            match num("SLURM_NTASKS")? {
                Some(world) if world > 1 => {
                    let rank = num("SLURM_PROCID")?.ok_or_else(|| {
                        env_error("SLURM_NTASKS is set but SLURM_PROCID is not".into())
                    })?;
                    (rank, world, num("SLURM_LOCALID")?.unwrap_or(0))
                }
                _ => return Ok(None),
            }
        };
        if world == 0 || rank >= world {
            return Err(env_error(format!(
                "rank {rank} does not fit a world of {world} processes"
            )));
        }
        let master_addr = match get("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ if world == 1 => "127.0.0.1".to_string(),
            _ => {
                return Err(env_error(
                    "MASTER_ADDR is not set: export the host name of rank 0 (under Slurm, the \
                     first node of $SLURM_JOB_NODELIST)"
                        .into(),
                ));
            }
        };
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| env_error(format!("MASTER_PORT={p:?} is not a port number")))?,
        };
        Ok(Some(WorldEnv {
            rank,
            world_size: world,
            local_rank: local,
            master_addr,
            master_port,
        }))
    }

    /// The world of one process (rank 0 of 1), for a run that is not distributed.
    pub fn single() -> Self {
        WorldEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
        }
    }
}

/// The timeout from `UNIV_DIST_TIMEOUT` (seconds), or [`DEFAULT_TIMEOUT`].
///
/// # Errors
/// A value that is not a positive number of seconds.
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var("UNIV_DIST_TIMEOUT") {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            _ => Err(env_error(format!(
                "UNIV_DIST_TIMEOUT={v:?} is not a positive number of seconds"
            ))),
        },
    }
}

const MAGIC: &[u8; 8] = b"univ-ddp";

/// The TCP connections of a run: rank 0 holds one to every other rank, the others one to
/// rank 0.
#[derive(Debug)]
struct Links {
    rank: usize,
    world: usize,
    /// Rank 0: `peers[r]` for ranks `1..world` (`peers[0]` unused); others: `peers[0]`.
    peers: Vec<Option<TcpStream>>,
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::Distributed(format!("{what}: {e}"))
}

fn read_u64(s: &mut TcpStream, what: &str) -> Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b).map_err(|e| io_error(what, e))?;
    Ok(u64::from_le_bytes(b))
}

impl Links {
    fn connect(env: &WorldEnv, timeout: Duration) -> Result<Self> {
        let world = env.world_size;
        let mut peers: Vec<Option<TcpStream>> = (0..world.max(1)).map(|_| None).collect();
        if world == 1 {
            return Ok(Links {
                rank: 0,
                world,
                peers,
            });
        }
        if env.rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", env.master_port)).map_err(|e| {
                io_error(&format!("rank 0 listening on port {}", env.master_port), e)
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_error("listener", e))?;
            let start = Instant::now();
            let mut joined = 1;
            while joined < world {
                match listener.accept() {
                    Ok((mut s, addr)) => {
                        s.set_nonblocking(false)
                            .map_err(|e| io_error("socket", e))?;
                        s.set_read_timeout(Some(timeout))
                            .map_err(|e| io_error("socket", e))?;
                        let mut magic = [0u8; 8];
                        if s.read_exact(&mut magic).is_err() || &magic != MAGIC {
                            // Not one of ours (a port scan, a stale client): ignore it.
                            continue;
                        }
                        let r = read_u64(&mut s, "handshake")? as usize;
                        let w = read_u64(&mut s, "handshake")? as usize;
                        if w != world || r == 0 || r >= world || peers[r].is_some() {
                            let _ = s.write_all(&[0]);
                            return Err(Error::Distributed(format!(
                                "{addr} joined as rank {r} of {w}, which does not fit this run \
                                 of {world} (or that rank is taken)"
                            )));
                        }
                        s.write_all(&[1]).map_err(|e| io_error("handshake", e))?;
                        s.set_nodelay(true).map_err(|e| io_error("socket", e))?;
                        peers[r] = Some(s);
                        joined += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if start.elapsed() > timeout {
                            let missing: Vec<usize> =
                                (1..world).filter(|r| peers[*r].is_none()).collect();
                            return Err(Error::Distributed(format!(
                                "ranks {missing:?} did not connect to port {} within {:.0} s",
                                env.master_port,
                                timeout.as_secs_f64()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(io_error("accepting a rank", e)),
                }
            }
        } else {
            let start = Instant::now();
            let target = format!("{}:{}", env.master_addr, env.master_port);
            let mut s = loop {
                let attempt = target
                    .to_socket_addrs()
                    .map_err(|e| io_error(&format!("resolving {target}"), e))?
                    .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok());
                if let Some(s) = attempt {
                    break s;
                }
                if start.elapsed() > timeout {
                    return Err(Error::Distributed(format!(
                        "rank {} could not reach rank 0 at {target} within {:.0} s",
                        env.rank,
                        timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            s.set_read_timeout(Some(timeout))
                .map_err(|e| io_error("socket", e))?;
            s.set_nodelay(true).map_err(|e| io_error("socket", e))?;
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&(env.rank as u64).to_le_bytes());
            hello.extend_from_slice(&(world as u64).to_le_bytes());
            s.write_all(&hello).map_err(|e| io_error("handshake", e))?;
            let mut ok = [0u8; 1];
            s.read_exact(&mut ok)
                .map_err(|e| io_error("handshake with rank 0", e))?;
            if ok[0] != 1 {
                return Err(Error::Distributed(format!(
                    "rank 0 refused rank {} of {world}",
                    env.rank
                )));
            }
            peers[0] = Some(s);
        }
        Ok(Links {
            rank: env.rank,
            world,
            peers,
        })
    }

    fn peer(&mut self, r: usize) -> &mut TcpStream {
        self.peers[r].as_mut().expect("connected")
    }

    fn send(s: &mut TcpStream, data: &[u8]) -> Result<()> {
        s.write_all(&(data.len() as u64).to_le_bytes())
            .and_then(|_| s.write_all(data))
            .map_err(|e| io_error("sending to a rank", e))
    }

    fn recv(s: &mut TcpStream, expect: usize) -> Result<Vec<u8>> {
        let n = read_u64(s, "receiving from a rank (did it stop?)")? as usize;
        if n != expect {
            return Err(Error::Distributed(format!(
                "a rank sent {n} bytes where {expect} were expected: the ranks disagree on the \
                 model or the configuration"
            )));
        }
        let mut b = vec![0u8; n];
        s.read_exact(&mut b)
            .map_err(|e| io_error("receiving from a rank", e))?;
        Ok(b)
    }

    /// Sums `v` over the ranks, in rank order, into every rank's `v`.
    fn all_reduce_sum(&mut self, v: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let bytes = v.len() * 4;
        if self.rank == 0 {
            for r in 1..self.world {
                let b = Self::recv(self.peer(r), bytes)?;
                for (a, c) in v.iter_mut().zip(b.chunks_exact(4)) {
                    *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            let out: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            for r in 1..self.world {
                Self::send(self.peer(r), &out)?;
            }
        } else {
            let out: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Self::send(self.peer(0), &out)?;
            let b = Self::recv(self.peer(0), bytes)?;
            for (a, c) in v.iter_mut().zip(b.chunks_exact(4)) {
                *a = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }

    /// Rank 0's `data` into every rank's (all of the same length).
    fn broadcast_bytes(&mut self, data: &mut [u8]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        if self.rank == 0 {
            for r in 1..self.world {
                Self::send(self.peer(r), data)?;
            }
        } else {
            let b = Self::recv(self.peer(0), data.len())?;
            data.copy_from_slice(&b);
        }
        Ok(())
    }
}

/// The processes of a run and the collectives between them (see the module docs).
pub struct ProcessGroup {
    env: WorldEnv,
    links: std::sync::Mutex<Links>,
    #[cfg(feature = "cuda")]
    nccl: Option<nccl::Nccl>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("env", &self.env)
            .field("backend", &self.backend())
            .finish()
    }
}

impl ProcessGroup {
    /// Joins the run `env` describes: connects to the other ranks (waiting up to `timeout`
    /// for them) and, when `device` is a CUDA GPU and the `cuda` feature is on, sets up NCCL
    /// on it.
    ///
    /// # Errors
    /// Ranks that do not connect in time or do not fit the run, NCCL errors.
    pub fn init(env: WorldEnv, device: &Device, timeout: Duration) -> Result<Self> {
        let mut links = Links::connect(&env, timeout)?;
        #[cfg(feature = "cuda")]
        let nccl = match device {
            Device::Cuda(d) => Some(nccl::Nccl::new(&env, d, &mut links)?),
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = (device, &mut links);
        Ok(ProcessGroup {
            env,
            links: std::sync::Mutex::new(links),
            #[cfg(feature = "cuda")]
            nccl,
        })
    }

    /// Where this process stands.
    pub fn env(&self) -> &WorldEnv {
        &self.env
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.env.rank
    }

    /// Processes in the run.
    pub fn world_size(&self) -> usize {
        self.env.world_size
    }

    /// `true` on rank 0, the one that writes logs and checkpoints.
    pub fn is_main(&self) -> bool {
        self.env.rank == 0
    }

    /// `"nccl"` or `"tcp"`: what carries the collectives.
    pub fn backend(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if self.nccl.is_some() {
            return "nccl";
        }
        "tcp"
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sum over the ranks of each tensor (`f32`, the same shapes on every rank), on the
    /// tensors' device.
    ///
    /// # Errors
    /// A rank that stopped or disagrees on the shapes, tensor errors.
    pub fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        self.collective(ts, false)
    }

    /// Rank 0's values of each tensor, on every rank.
    ///
    /// # Errors
    /// As [`all_reduce_sum`](Self::all_reduce_sum).
    pub fn broadcast(&self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
        self.collective(ts, true)
    }

    /// A broadcast from rank 0 or a sum: over NCCL when every tensor is on a CUDA device and
    /// the group has a communicator, else over the TCP links as one flat f32 buffer.
    fn collective(&self, ts: &[Tensor], broadcast: bool) -> Result<Vec<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(n) = &self.nccl
            && ts.iter().all(|t| t.device().is_cuda())
        {
            return if broadcast {
                n.broadcast(ts)
            } else {
                n.all_reduce_sum(ts)
            };
        }
        let mut flat: Vec<f32> = Vec::new();
        for t in ts {
            flat.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        if broadcast {
            let mut bytes: Vec<u8> = flat.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.links().broadcast_bytes(&mut bytes)?;
            flat = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
        } else {
            self.links().all_reduce_sum(&mut flat)?;
        }
        split_like(&flat, ts)
    }
}

/// `flat` cut into tensors shaped, typed and placed as `like`.
fn split_like(flat: &[f32], like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(like.len());
    let mut at = 0;
    for t in like {
        let n = t.elem_count();
        let v =
            Tensor::from_slice(&flat[at..at + n], t.shape(), t.device())?.to_dtype(t.dtype())?;
        out.push(v);
        at += n;
    }
    Ok(out)
}

/// The global micro-batch indices rank `rank` of `world` takes for steps `start..end` with
/// `accumulate` micro-batches per rank and step, in order (see the module docs).
pub fn rank_micro_batches(
    start: u64,
    end: u64,
    accumulate: u64,
    rank: usize,
    world: usize,
) -> Vec<u64> {
    let w = world as u64;
    (start..end)
        .flat_map(|s| (0..accumulate).map(move |i| (s * accumulate + i) * w + rank as u64))
        .collect()
}

#[cfg(feature = "cuda")]
mod nccl {
    //! The collectives on CUDA devices through NCCL.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CudaDevice, CudaStorage, CustomOp1, Layout, Shape, Tensor};

    use super::{Links, WorldEnv};
    use crate::error::{Error, Result};

    fn nccl_error(
        what: &str,
    ) -> impl Fn(candle_core::cuda::cudarc::nccl::result::NcclError) -> Error + '_ {
        move |e| {
            Error::Distributed(format!(
                "NCCL {what}: {e:?} (libnccl.so.2 must be on the library path)"
            ))
        }
    }

    pub(super) struct Nccl {
        comm: Comm,
    }

    impl Nccl {
        pub(super) fn new(env: &WorldEnv, dev: &CudaDevice, links: &mut Links) -> Result<Self> {
            let mut raw = [0u8; 128];
            if env.rank == 0 {
                let id = Id::new().map_err(nccl_error("unique id"))?;
                for (b, c) in raw.iter_mut().zip(id.internal()) {
                    *b = *c as u8;
                }
            }
            links.broadcast_bytes(&mut raw)?;
            let mut internal = [0 as core::ffi::c_char; 128];
            for (c, b) in internal.iter_mut().zip(raw) {
                *c = b as core::ffi::c_char;
            }
            let comm = Comm::from_rank(
                dev.cuda_stream(),
                env.rank,
                env.world_size,
                Id::uninit(internal),
            )
            .map_err(nccl_error("communicator"))?;
            Ok(Nccl { comm })
        }

        fn apply(&self, ts: &[Tensor], broadcast: bool) -> Result<Vec<Tensor>> {
            let op = Collective {
                comm: &self.comm,
                broadcast,
            };
            ts.iter()
                .map(|t| Ok(t.contiguous()?.apply_op1_no_bwd(&op)?))
                .collect()
        }

        pub(super) fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
            self.apply(ts, false)
        }

        pub(super) fn broadcast(&self, ts: &[Tensor]) -> Result<Vec<Tensor>> {
            self.apply(ts, true)
        }
    }

    /// One NCCL all-reduce (sum) or broadcast from rank 0, as an operation on a tensor: the
    /// result is a new device buffer.
    struct Collective<'a> {
        comm: &'a Comm,
        broadcast: bool,
    }

    impl CustomOp1 for Collective<'_> {
        fn name(&self) -> &'static str {
            if self.broadcast {
                "univ-nccl-broadcast"
            } else {
                "univ-nccl-all-reduce"
            }
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("{}: the tensor is not on a CUDA device", self.name())
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dev = s.device().clone();
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("{}: expected a contiguous tensor", self.name())
            };
            let src = s.as_cuda_slice::<f32>()?.slice(a..b);
            let mut dst = dev.alloc_zeros::<f32>(b - a)?;
            let r = if self.broadcast {
                self.comm.broadcast(Some(&src), &mut dst, 0)
            } else {
                self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum)
            };
            r.map_err(|e| candle_core::Error::Msg(format!("{}: {e:?}", self.name())))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(a, _)| *a == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn torchrun_and_slurm_environments_are_read_and_checked() {
        assert_eq!(WorldEnv::from_vars(vars(&[])).unwrap(), None);
        // A Slurm job of one task is not a distributed run.
        assert_eq!(
            WorldEnv::from_vars(vars(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")])).unwrap(),
            None
        );
        let t = WorldEnv::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node07"),
            ("MASTER_PORT", "29555"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            t,
            WorldEnv {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                master_addr: "node07".into(),
                master_port: 29555
            }
        );
        let s = WorldEnv::from_vars(vars(&[
            ("SLURM_NTASKS", "4"),
            ("SLURM_PROCID", "2"),
            ("SLURM_LOCALID", "0"),
            ("MASTER_ADDR", "gpu-a1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank), (2, 4, 0));
        assert_eq!(s.master_port, DEFAULT_MASTER_PORT);
        // World size 1 needs no address.
        let one = WorldEnv::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "1")]))
            .unwrap()
            .unwrap();
        assert_eq!(one.master_addr, "127.0.0.1");
        for (bad, needle) in [
            (vec![("RANK", "2"), ("WORLD_SIZE", "2")], "does not fit"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "0")], "does not fit"),
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=\"x\""),
            (vec![("WORLD_SIZE", "2")], "RANK is not"),
            (vec![("RANK", "1"), ("WORLD_SIZE", "2")], "MASTER_ADDR"),
            (
                vec![
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT",
            ),
        ] {
            let e = WorldEnv::from_vars(vars(&bad)).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn ranks_split_the_micro_batches_of_one_accumulating_process() {
        // Two ranks with accumulation 2 take, between them, the micro-batches one process
        // with accumulation 4 takes, step by step.
        let r0 = rank_micro_batches(3, 5, 2, 0, 2);
        let r1 = rank_micro_batches(3, 5, 2, 1, 2);
        assert_eq!(r0, vec![12, 14, 16, 18]);
        assert_eq!(r1, vec![13, 15, 17, 19]);
        let mut both: Vec<u64> = r0.iter().chain(&r1).copied().collect();
        both.sort_unstable();
        assert_eq!(both, rank_micro_batches(3, 5, 4, 0, 1));
        assert_eq!(rank_micro_batches(0, 2, 3, 0, 1), vec![0, 1, 2, 3, 4, 5]);
    }

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn three_ranks_sum_and_broadcast_over_tcp() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let env = WorldEnv {
                        rank,
                        world_size: 3,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let g = ProcessGroup::init(env, &Device::Cpu, Duration::from_secs(30)).unwrap();
                    assert_eq!(g.backend(), "tcp");
                    let a = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
                    let b = Tensor::full(rank as f32, (2, 2), &Device::Cpu).unwrap();
                    let a = (a * (rank as f64 + 1.0)).unwrap();
                    let s = g.all_reduce_sum(&[a, b.clone()]).unwrap();
                    let bc = g.broadcast(&[b]).unwrap();
                    (
                        s[0].to_vec1::<f32>().unwrap(),
                        s[1].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        bc[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (a, b, bc) = h.join().unwrap();
            assert_eq!(a, vec![6.0, 12.0, 18.0]); // (1 + 2 + 3) × [1, 2, 3]
            assert_eq!(b, vec![3.0; 4]); // 0 + 1 + 2
            assert_eq!(bc, vec![0.0; 4]); // rank 0's
        }
    }

    #[test]
    fn a_rank_that_does_not_fit_or_never_comes_is_an_error() {
        let port = free_port();
        let env = move |rank, world| WorldEnv {
            rank,
            world_size: world,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let root = std::thread::spawn(move || {
            ProcessGroup::init(env(0, 2), &Device::Cpu, Duration::from_secs(20)).map(|_| ())
        });
        // A rank of another world size is refused, and rank 0 says why.
        let other = ProcessGroup::init(env(1, 3), &Device::Cpu, Duration::from_secs(20));
        assert!(other.is_err());
        let e = root.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        // Nobody joins: rank 0 gives up after the timeout and names the missing rank.
        let e = ProcessGroup::init(env(0, 2), &Device::Cpu, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ranks [1] did not connect"), "{e}");
    }
}
