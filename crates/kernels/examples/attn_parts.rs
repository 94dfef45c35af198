use std::time::Instant;
use ultramoe_kernels::gemm::{gemm_strided, Op, Strided};
use ultramoe_kernels::vmath;
fn main() {
    let (t, nh, dqk) = (256usize, 4usize, 48usize);
    let q = vec![0.01f32; t * nh * dqk];
    let mut p = vec![0.0f32; t * t];
    let reps = 200;
    let st = Instant::now();
    for _ in 0..reps {
        for r0 in (0..t).step_by(64) {
            let r1 = r0 + 64;
            unsafe {
                gemm_strided(64, r1, dqk, p.as_mut_ptr().add(r0 * t), Strided { rs: t as isize, cs: 1 },
                    q.as_ptr().add(r0 * nh * dqk), Strided::row_major(nh * dqk, Op::N),
                    q.as_ptr(), Strided::row_major(nh * dqk, Op::T), false, 0.1, false);
            }
        }
    }
    println!("QK^T per head: {:.1} us", st.elapsed().as_secs_f64() / reps as f64 * 1e6);
    let st = Instant::now();
    for _ in 0..reps {
        for i in 0..t {
            let row = &mut p[i * t..(i + 1) * t];
            let max = vmath::max(&row[..=i]);
            let sum = vmath::exp_shifted_sum(&mut row[..=i], max);
            vmath::scale(&mut row[..=i], 1.0 / sum);
            row[i + 1..].fill(0.0);
        }
    }
    println!("softmax per head: {:.1} us", st.elapsed().as_secs_f64() / reps as f64 * 1e6);
}
