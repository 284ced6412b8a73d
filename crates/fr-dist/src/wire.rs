//! Tensors on a TCP stream: a header naming the operation, dtype and shape, then the elements
//! in little-endian order.
//!
//! Frame: `b"FRT1"`, operation `u8`, dtype `u8`, rank count `u8`, dims `u64` × rank count,
//! payload length `u64`, payload. A frame may carry the shape alone (payload length 0 for a
//! non-empty shape) where the receiver only needs to check it (broadcast from another rank).

use std::io::{Read, Write};

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

const MAGIC: &[u8; 4] = b"FRT1";

/// The operation a frame belongs to; a peer sending another one is a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    AllGather = 1,
    AllReduceSum = 2,
    AllReduceMax = 3,
    ReduceScatter = 4,
    Broadcast = 5,
}

impl Op {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::AllGather,
            2 => Self::AllReduceSum,
            3 => Self::AllReduceMax,
            4 => Self::ReduceScatter,
            5 => Self::Broadcast,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::AllGather => "all_gather",
            Self::AllReduceSum => "all_reduce(sum)",
            Self::AllReduceMax => "all_reduce(max)",
            Self::ReduceScatter => "reduce_scatter",
            Self::Broadcast => "broadcast",
        }
    }
}

fn dtype_code(d: DType) -> Option<u8> {
    Some(match d {
        DType::U8 => 1,
        DType::U32 => 2,
        DType::I64 => 3,
        DType::BF16 => 4,
        DType::F16 => 5,
        DType::F32 => 6,
        DType::F64 => 7,
        _ => return None,
    })
}

fn dtype_of(code: u8) -> Option<DType> {
    Some(match code {
        1 => DType::U8,
        2 => DType::U32,
        3 => DType::I64,
        4 => DType::BF16,
        5 => DType::F16,
        6 => DType::F32,
        7 => DType::F64,
        _ => return None,
    })
}

/// A frame read from a stream.
#[derive(Debug)]
pub(crate) struct Frame {
    pub op: Op,
    pub dtype: DType,
    pub dims: Vec<usize>,
    /// `None` for a shape-only frame.
    pub tensor: Option<Tensor>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The elements of `t` (any layout) as little-endian bytes.
fn to_bytes(t: &Tensor) -> std::io::Result<Vec<u8>> {
    let flat = t.flatten_all().map_err(io_err)?;
    macro_rules! bytes {
        ($ty:ty) => {
            flat.to_vec1::<$ty>()
                .map_err(io_err)?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        };
    }
    Ok(match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>().map_err(io_err)?,
        DType::U32 => bytes!(u32),
        DType::I64 => bytes!(i64),
        DType::BF16 => bytes!(bf16),
        DType::F16 => bytes!(f16),
        DType::F32 => bytes!(f32),
        DType::F64 => bytes!(f64),
        d => return Err(io_err(format!("dtype {d:?} cannot cross ranks"))),
    })
}

fn from_bytes(
    bytes: &[u8],
    dtype: DType,
    dims: &[usize],
    device: &Device,
) -> std::io::Result<Tensor> {
    macro_rules! parse {
        ($ty:ty, $n:expr) => {{
            let v: Vec<$ty> = bytes
                .chunks_exact($n)
                .map(|c| <$ty>::from_le_bytes(c.try_into().expect("chunk of the element size")))
                .collect();
            Tensor::from_vec(v, dims, device)
        }};
    }
    let t = match dtype {
        DType::U8 => Tensor::from_vec(bytes.to_vec(), dims, device),
        DType::U32 => parse!(u32, 4),
        DType::I64 => parse!(i64, 8),
        DType::BF16 => parse!(bf16, 2),
        DType::F16 => parse!(f16, 2),
        DType::F32 => parse!(f32, 4),
        DType::F64 => parse!(f64, 8),
        d => return Err(io_err(format!("dtype {d:?} cannot cross ranks"))),
    };
    t.map_err(io_err)
}

/// Send `t` under `op`; `shape_only` sends the header without the elements.
pub(crate) fn send(
    s: &mut impl Write,
    op: Op,
    t: &Tensor,
    shape_only: bool,
) -> std::io::Result<()> {
    let code = dtype_code(t.dtype())
        .ok_or_else(|| io_err(format!("dtype {:?} cannot cross ranks", t.dtype())))?;
    let dims = t.dims();
    if dims.len() > u8::MAX as usize {
        return Err(io_err("too many dimensions"));
    }
    let payload = if shape_only { Vec::new() } else { to_bytes(t)? };
    let mut msg = Vec::with_capacity(20 + 8 * dims.len() + payload.len());
    msg.extend_from_slice(MAGIC);
    msg.extend_from_slice(&[op as u8, code, dims.len() as u8]);
    for &d in dims {
        msg.extend_from_slice(&(d as u64).to_le_bytes());
    }
    msg.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    msg.extend_from_slice(&payload);
    s.write_all(&msg)
}

fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Read one frame, building its tensor on `device`.
pub(crate) fn recv(s: &mut impl Read, device: &Device) -> std::io::Result<Frame> {
    let mut head = [0u8; 7];
    s.read_exact(&mut head)?;
    if &head[..4] != MAGIC {
        return Err(io_err(
            "not an fr tensor frame (out of step with the peer?)",
        ));
    }
    let op =
        Op::from_u8(head[4]).ok_or_else(|| io_err(format!("unknown operation {}", head[4])))?;
    let dtype =
        dtype_of(head[5]).ok_or_else(|| io_err(format!("unknown dtype code {}", head[5])))?;
    let mut dims = Vec::with_capacity(head[6] as usize);
    for _ in 0..head[6] {
        dims.push(read_u64(s)? as usize);
    }
    let len = read_u64(s)? as usize;
    let numel: usize = dims.iter().product();
    let expected = numel * dtype.size_in_bytes();
    if len != 0 && len != expected {
        return Err(io_err(format!(
            "payload of {len} bytes for {dims:?} {dtype:?} ({expected} expected)"
        )));
    }
    let tensor = if len == 0 && numel != 0 {
        None
    } else {
        let mut bytes = vec![0u8; len];
        s.read_exact(&mut bytes)?;
        Some(from_bytes(&bytes, dtype, &dims, device)?)
    };
    Ok(Frame {
        op,
        dtype,
        dims,
        tensor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips() {
        let dev = Device::Cpu;
        let base = Tensor::new(&[[1.5f64, -2.25, 0.0], [3.0, 1e-3, -7.5]], &dev).unwrap();
        for dtype in [
            DType::U8,
            DType::U32,
            DType::I64,
            DType::BF16,
            DType::F16,
            DType::F32,
            DType::F64,
        ] {
            let t = base.abs().unwrap().to_dtype(dtype).unwrap();
            // A non-contiguous view: the frame carries the logical order.
            let t = t.t().unwrap();
            let mut buf = Vec::new();
            send(&mut buf, Op::AllGather, &t, false).unwrap();
            let f = recv(&mut buf.as_slice(), &dev).unwrap();
            assert_eq!(
                (f.op, f.dtype, f.dims.as_slice()),
                (Op::AllGather, dtype, t.dims())
            );
            let got = f
                .tensor
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            let want = t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            assert_eq!(got, want, "{dtype:?}");
        }
        let mut buf = Vec::new();
        send(&mut buf, Op::Broadcast, &base, true).unwrap();
        let f = recv(&mut buf.as_slice(), &dev).unwrap();
        assert!(f.tensor.is_none());
        assert_eq!(f.dims, vec![2, 3]);
        // A corrupted header is refused.
        let mut bad = Vec::new();
        send(&mut bad, Op::AllGather, &base, false).unwrap();
        bad[0] = b'X';
        assert!(recv(&mut bad.as_slice(), &dev).is_err());
    }
}
