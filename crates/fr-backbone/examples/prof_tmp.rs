use std::time::Instant;
use candle_core::{DType, Device, Tensor, Module};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::{seeded_var_builder, IResNet, IResNetConfig};
fn main() -> fr_backbone::Result<()> {
    let dev = Device::Cpu;
    let cfg = IResNetConfig { layers: [1,1,1,1], widths: [16,32,64,128], embedding_size: 512, input_size: 56, dropout: 0.0 };
    let varmap = VarMap::new();
    let net = IResNet::new(&cfg, seeded_var_builder(&varmap, 0, DType::F32, &dev))?;
    let x = Tensor::randn(0f32, 1f32, (64, 3, 56, 56), &dev)?;
    for _ in 0..3 {
        let t = Instant::now();
        let emb = net.forward_t(&x, true)?;
        let loss = emb.sqr()?.mean_all()?;
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _g = loss.backward()?;
        let b = t.elapsed().as_secs_f64();
        println!("fwd train {f:.3}s bwd {b:.3}s");
    }
    // conv alone: 16->16 3x3 s1 on 56x56 and 16->16 s2
    let v = candle_core::Var::randn(0f32, 1f32, (16, 16, 3, 3), &dev)?;
    let xi = candle_core::Var::randn(0f32, 1f32, (64, 16, 56, 56), &dev)?;
    for (s, name) in [(1usize, "s1"), (2, "s2")] {
        let t = Instant::now();
        let y = xi.as_tensor().conv2d(v.as_tensor(), 1, s, 1, 1)?;
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _g = y.sum_all()?.backward()?;
        println!("conv 16->16 {name} on (64,16,56,56): fwd {f:.3}s bwd {:.3}s", t.elapsed().as_secs_f64());
    }
    let p = candle_nn::PReLU::new(Tensor::ones(16, DType::F32, &dev)?, false);
    let t = Instant::now();
    let y = p.forward(xi.as_tensor())?;
    let f = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let _g = y.sum_all()?.backward()?;
    println!("prelu (64,16,56,56): fwd {f:.3}s bwd {:.3}s", t.elapsed().as_secs_f64());
    let bn = candle_nn::batch_norm(16, 1e-5, candle_nn::VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev))?;
    let t = Instant::now();
    let y = bn.forward_t(xi.as_tensor(), true)?;
    let f = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let _g = y.sum_all()?.backward()?;
    println!("bn train (64,16,56,56): fwd {f:.3}s bwd {:.3}s", t.elapsed().as_secs_f64());
    Ok(())
}
