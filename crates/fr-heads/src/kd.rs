//! Knowledge-distillation losses between a student and a frozen teacher embedding (not a
//! registered head: it needs the teacher's output, which the [`crate::Head`] trait does not
//! carry).
//!
//! `normalized_mse(s, t) = (1/(B·D))·Σ_i ‖ŝ_i − sg(t̂_i)‖²` for student and teacher embeddings
//! `(B, D)`, `x̂ = x/‖x‖` (rows floored at 1e-12) and the teacher detached: the mean squared
//! error over all entries (`torch.nn.MSELoss` on `F.normalize`d embeddings). Zero exactly when
//! every student row points the way of its teacher row; it ignores the norms. Used by:
//! - SFace (Boutros et al., IJCB 2022): KT is this loss alone (label-free); CL is
//!   `CE_CosFace + 10000·MSE` ([`SFACE_CL_WEIGHT`]). Reported LFW 91.87 (CLS) and 99.13 (CL).
//! - PocketNet (Boutros et al.): multi-step KD from an IResNet-100 teacher of the same
//!   embedding size, `CE_ArcFace + 100·MSE` ([`POCKETNET_KD_WEIGHT`]).
//! - QuantFace (Boutros et al., ICPR 2022): the quantised model against its frozen
//!   full-precision self, this loss alone on synthetic data.
//!
//! [`distillation_loss`] combines a head's loss with the weighted MSE.

use candle_core::Tensor;

use crate::common;
use crate::{Error, Result};

/// Weight of the MSE term of SFace's CL strategy (`CE + 10000·MSE`).
pub const SFACE_CL_WEIGHT: f64 = 10_000.0;

/// Weight of the MSE term of PocketNet's KD (`CE + 100·MSE`).
pub const POCKETNET_KD_WEIGHT: f64 = 100.0;

/// MSE of the L2-normalised student and (detached) teacher embeddings, a scalar `()`.
///
/// # Errors
/// Shape mismatch (both must be `(B, D)`), candle errors.
pub fn normalized_mse(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    if student.dims() != teacher.dims() || student.rank() != 2 {
        return Err(Error::Shape {
            what: "teacher".into(),
            expected: format!("(B, D) = {:?} like the student", student.dims()),
            got: format!("{:?}", teacher.dims()),
        });
    }
    let s = common::l2_normalize(student)?;
    let t = common::l2_normalize(&teacher.detach().to_dtype(student.dtype())?)?;
    Ok((s - t)?.sqr()?.mean_all()?)
}

/// `head_loss + weight·normalized_mse(student, teacher)`.
///
/// # Errors
/// See [`normalized_mse`]; [`Error::Config`] (`kd_weight`) for a negative or non-finite
/// weight.
pub fn distillation_loss(
    head_loss: &Tensor,
    student: &Tensor,
    teacher: &Tensor,
    weight: f64,
) -> Result<Tensor> {
    common::check_range("kd_weight", weight, 0.0, f64::MAX)?;
    let mse = normalized_mse(student, teacher)?;
    Ok((head_loss + (mse * weight)?.to_dtype(head_loss.dtype())?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_core::{DType, Device, Var};

    fn data() -> (Tensor, Tensor) {
        let s: Vec<f64> = (0..15).map(|i| (i as f64 * 0.7 + 0.2).sin()).collect();
        let t: Vec<f64> = (0..15)
            .map(|i| (i as f64 * 1.1 - 0.4).cos() * 3.0)
            .collect();
        (
            Tensor::from_vec(s, (3, 5), &Device::Cpu).unwrap(),
            Tensor::from_vec(t, (3, 5), &Device::Cpu).unwrap(),
        )
    }

    #[test]
    fn zero_for_identical_directions() -> Result<()> {
        let (s, _) = data();
        let scaled = s.broadcast_mul(&Tensor::new(&[[2.0f64], [0.5], [7.0]], &Device::Cpu)?)?;
        assert!(common::scalar(&normalized_mse(&s, &scaled)?)? < 1e-28);
        // Antiparallel rows: ‖ŝ − t̂‖² = 4 per row, / D.
        let v = common::scalar(&normalized_mse(&s, &s.neg()?)?)?;
        assert!((v - 4.0 / 5.0).abs() < 1e-14);
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences_and_teacher_is_detached() -> Result<()> {
        let (s, t) = data();
        assert!(fd_check(&s, |s| normalized_mse(s, &t))? < 1e-8);
        let tv = Var::from_tensor(&t)?;
        let sv = Var::from_tensor(&s)?;
        let g = normalized_mse(sv.as_tensor(), tv.as_tensor())?.backward()?;
        assert!(g.get(&tv).is_none() && g.get(&sv).is_some());
        let ce = Tensor::new(1.5f64, &Device::Cpu)?;
        let l = distillation_loss(&ce, &s, &t, POCKETNET_KD_WEIGHT)?;
        let want = 1.5 + 100.0 * common::scalar(&normalized_mse(&s, &t)?)?;
        assert!((common::scalar(&l)? - want).abs() < 1e-12);
        assert!(distillation_loss(&ce, &s, &t, -1.0).is_err());
        assert!(normalized_mse(&s, &t.narrow(1, 0, 4)?).is_err());
        let half = normalized_mse(&s.to_dtype(DType::F32)?, &t)?;
        assert_eq!(half.dtype(), DType::F32);
        Ok(())
    }
}
