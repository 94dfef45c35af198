//! The worked-answer builder every problem kind writes its steps with.
//!
//! A worked answer is a list of steps separated by `;`. A step that computes is
//! `a op b = r` written without spaces, with operands and results kept small enough for
//! a small model to do in one go: additions and subtractions of magnitudes (a negative
//! result gets its own sign step `=-r`), products by one digit at a time, long division
//! by one digit of the dividend at a time. Other steps restate where the work stands
//! (an expression after one operation, an intermediate formula). The answer is the text
//! after the last `|` when there is one, else what the last step computes.

/// Records steps and returns their values.
#[derive(Default)]
pub struct Steps(pub Vec<String>);

impl Steps {
    /// `a + b`.
    pub fn add(&mut self, a: i64, b: i64) -> i64 {
        self.combine(a, b)
    }

    /// `a - b`.
    pub fn sub(&mut self, a: i64, b: i64) -> i64 {
        if b == 0 {
            self.0.push(format!("{a}-0={a}"));
            return a;
        }
        self.combine(a, -b)
    }

    /// `a + b` for signed `a`, `b`, written with additions and subtractions of
    /// magnitudes only, larger minus smaller; a negative result gets its own step
    /// `=-r`. So `75-431` becomes `431-75=356;=-356` and `-31-9` becomes
    /// `31+9=40;=-40`: every digit computation has non-negative operands and result.
    pub fn combine(&mut self, a: i64, b: i64) -> i64 {
        let r = a + b;
        match (a >= 0, b >= 0) {
            (true, true) => self.0.push(format!("{a}+{b}={r}")),
            (false, false) => {
                self.0.push(format!("{}+{}={}", -a, -b, -r));
                self.0.push(format!("={r}"));
            }
            _ => {
                let (p, n) = if a >= 0 { (a, -b) } else { (b, -a) };
                if p >= n {
                    self.0.push(format!("{p}-{n}={r}"));
                } else {
                    self.0.push(format!("{n}-{p}={}", -r));
                    self.0.push(format!("={r}"));
                }
            }
        }
        r
    }

    /// `a * b`: one step when `|b| < 10` (signs on the operands: `-7*3=-21`), else one
    /// partial product per digit of `b` (`a·d_i·10^i`) and a running sum, of the
    /// magnitudes, and a sign step `=-r` when the product is negative.
    pub fn mul(&mut self, a: i64, b: i64) -> i64 {
        if b.abs() < 10 {
            let r = a * b;
            self.0.push(format!("{a}*{b}={r}"));
            return r;
        }
        if a < 0 || b < 0 {
            let r = self.mul(a.abs(), b.abs());
            if (a < 0) != (b < 0) && r != 0 {
                self.0.push(format!("={}", -r));
                return -r;
            }
            return r;
        }
        let mut rest = b;
        let mut place = 1;
        let mut total: Option<i64> = None;
        while rest > 0 {
            let d = rest % 10 * place;
            let p = a * d;
            self.0.push(format!("{a}*{d}={p}"));
            total = Some(match total {
                None => p,
                Some(t) => self.add(t, p),
            });
            rest /= 10;
            place *= 10;
        }
        total.unwrap_or(0)
    }

    /// `a * b` with the operand of fewer digits as the multiplier (fewer partial
    /// products: `6*45` is written `45*6`).
    pub fn mul_short(&mut self, a: i64, b: i64) -> i64 {
        if digits(a) < digits(b) {
            self.mul(b, a)
        } else {
            self.mul(a, b)
        }
    }

    /// `a / b`, exact, in one step (a quotient the model knows from its tables).
    pub fn div(&mut self, a: i64, b: i64) -> i64 {
        let r = a / b;
        self.0.push(format!("{a}/{b}={r}"));
        r
    }

    /// Long division of `a ≥ 0` by `b > 0`, one digit of the dividend at a time: each
    /// step `n/b=q r m` divides the running remainder with the next digit brought down
    /// (`847/7`: `8/7=1r1;14/7=2r0;7/7=1r0`). The first step takes the shortest leading
    /// part of `a` that is at least `b` (all of `a` when `a < b`). Returns `(q, r)`.
    pub fn long_div(&mut self, a: i64, b: i64) -> (i64, i64) {
        let ds: Vec<i64> = a.to_string().bytes().map(|c| (c - b'0') as i64).collect();
        let mut cur = 0;
        let mut i = 0;
        while i < ds.len() {
            cur = cur * 10 + ds[i];
            i += 1;
            if cur >= b {
                break;
            }
        }
        let mut q = 0;
        loop {
            let (qd, r) = (cur / b, cur % b);
            self.0.push(format!("{cur}/{b}={qd}r{r}"));
            q = q * 10 + qd;
            if i == ds.len() {
                return (q, r);
            }
            cur = r * 10 + ds[i];
            i += 1;
        }
    }

    /// `v^k` in one step (small powers the model knows).
    pub fn pow(&mut self, v: i64, k: u32) -> i64 {
        let r = v.pow(k);
        if v < 0 {
            self.0.push(format!("({v})^{k}={r}"));
        } else {
            self.0.push(format!("{v}^{k}={r}"));
        }
        r
    }

    /// A step that states something without computing (a rewritten expression, a
    /// formula).
    pub fn note(&mut self, s: impl Into<String>) {
        self.0.push(s.into());
    }

    /// The worked answer: the steps, and `|answer` when the answer is not simply what
    /// the last step computes.
    pub fn finish_with(self, answer: Option<&str>) -> String {
        let mut w = self.0.join(";");
        if let Some(a) = answer {
            w.push('|');
            w.push_str(a);
        }
        w
    }
}

/// Decimal digits of `|v|`.
pub fn digits(v: i64) -> u32 {
    v.unsigned_abs().checked_ilog10().unwrap_or(0) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_written_as_specified() {
        let mut s = Steps::default();
        assert_eq!(s.mul(58, 73), 4234);
        assert_eq!(s.0.join(";"), "58*3=174;58*70=4060;174+4060=4234");
        let mut s = Steps::default();
        assert_eq!(s.sub(75, 431), -356);
        assert_eq!(s.sub(-31, 9), -40);
        assert_eq!(s.add(-31, 40), 9);
        assert_eq!(s.0.join(";"), "431-75=356;=-356;31+9=40;=-40;40-31=9");
        let mut s = Steps::default();
        assert_eq!(s.long_div(847, 7), (121, 0));
        assert_eq!(s.long_div(100, 7), (14, 2));
        assert_eq!(s.long_div(5, 7), (0, 5));
        assert_eq!(s.0.join(";"), "8/7=1r1;14/7=2r0;7/7=1r0;10/7=1r3;30/7=4r2;5/7=0r5");
        let mut s = Steps::default();
        assert_eq!(s.mul_short(6, 45), 270);
        assert_eq!(s.pow(-2, 3), -8);
        assert_eq!(s.finish_with(Some("x")), "45*6=270;(-2)^3=-8|x");
        assert_eq!((digits(0), digits(-99), digits(100)), (1, 2, 3));
    }
}
