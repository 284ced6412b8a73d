//! Summation in numpy's order, so means, standard deviations and areas match the Python
//! references bit for bit (numpy sums the fast axis pairwise, with 8 accumulators per block
//! of at most 128 values).

/// `numpy.sum` of a contiguous 1-D float64 array.
pub(crate) fn np_sum(a: &[f64]) -> f64 {
    pairwise(a)
}

/// `numpy.sum` of a contiguous 1-D float32 array (accumulated in float32, as numpy does).
pub(crate) fn np_sum_f32(a: &[f32]) -> f32 {
    pairwise(a)
}

fn pairwise<T: Copy + Default + std::ops::Add<Output = T> + std::ops::AddAssign>(a: &[T]) -> T {
    let n = a.len();
    if n < 8 {
        a.iter().fold(T::default(), |acc, &x| acc + x)
    } else if n <= 128 {
        let mut r = [T::default(); 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        let mut i = 8;
        while i < full {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[full..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise(&a[..n2]) + pairwise(&a[n2..])
    }
}

/// `numpy.mean`.
pub(crate) fn np_mean(a: &[f64]) -> f64 {
    np_sum(a) / a.len() as f64
}

/// `numpy.std` (population, ddof = 0).
pub(crate) fn np_std(a: &[f64]) -> f64 {
    let mean = np_mean(a);
    let sq: Vec<f64> = a
        .iter()
        .map(|&x| {
            let d = x - mean;
            d * d
        })
        .collect();
    (np_sum(&sq) / a.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_order_differs_from_sequential_and_is_exact_on_small_inputs() {
        // 1e16 followed by fifteen ones: a sequential sum loses every one (ulp is 2 there);
        // numpy's 8 accumulators lose only the one added to 1e16 itself.
        let mut a = vec![1.0; 16];
        a[0] = 1e16;
        let seq = a.iter().fold(0.0, |s, &x| s + x);
        assert_eq!(seq, 1e16);
        assert_eq!(np_sum(&a), 1e16 + 14.0);
        assert_eq!(np_sum(&[1.0, 2.0, 3.0]), 6.0);
        assert_eq!(
            np_sum(&(0..1000).map(f64::from).collect::<Vec<_>>()),
            499_500.0
        );
        assert_eq!(np_std(&[1.0, 3.0]), 1.0);
    }

    #[test]
    fn squared_distances_equal_numpy_bit_for_bit() {
        // verification.py: dist = np.sum(np.square(e1 - e2), 1) on the golden inputs.
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../tests/golden/verification.json")).unwrap();
        let rows = |key: &str| -> Vec<Vec<f64>> {
            v["inputs"][key]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect()
                })
                .collect()
        };
        let (e1, e2) = (rows("embeddings1"), rows("embeddings2"));
        let want = v["outputs"]["squared_l2_distance"].as_array().unwrap();
        let mut sequential_differs = 0;
        for ((a, b), w) in e1.iter().zip(&e2).zip(want) {
            let sq: Vec<f64> = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).collect();
            let w = w.as_f64().unwrap();
            assert_eq!(np_sum(&sq), w);
            sequential_differs += usize::from(sq.iter().sum::<f64>() != w);
        }
        // The order matters: a plain left-to-right sum misses some of them.
        assert!(sequential_differs > 0);
    }
}
