//! Derivatives (polynomials, a power times sin/cos/exp, the chain rule on a linear
//! argument) and integrals of polynomials (indefinite, and definite between integer
//! limits), with the request spelled the ways people spell it.

use super::steps::Steps;
use super::{nonzero, Kind, Problem};
use ultramoe_model::init::Rng;

/// A polynomial as `(coefficient, exponent)` terms, exponents strictly decreasing,
/// coefficients non-zero.
pub type Poly = Vec<(i64, u32)>;

/// `c·x^n` as written: `3x^4`, `-x^2`, `7x`, `-5`, `x`.
pub fn monomial(c: i64, n: u32) -> String {
    let var = match n {
        0 => return c.to_string(),
        1 => "x".to_string(),
        n => format!("x^{n}"),
    };
    match c {
        1 => var,
        -1 => format!("-{var}"),
        c => format!("{c}{var}"),
    }
}

/// `(sign, text)` terms joined as a person writes them (`3x^4 - 2x^2 + 7x - 5`), or
/// without spaces; no terms is `0`.
pub fn join_terms(terms: &[(i64, String)], spaced: bool) -> String {
    let mut out = String::new();
    for (i, (sign, body)) in terms.iter().enumerate() {
        match (i, *sign < 0, spaced) {
            (0, true, _) => out.push('-'),
            (0, false, _) => {}
            (_, true, true) => out.push_str(" - "),
            (_, false, true) => out.push_str(" + "),
            (_, true, false) => out.push('-'),
            (_, false, false) => out.push('+'),
        }
        out.push_str(body);
    }
    if out.is_empty() {
        out.push('0');
    }
    out
}

/// A polynomial's text.
pub fn poly_text(p: &Poly, spaced: bool) -> String {
    let terms: Vec<(i64, String)> = p.iter().map(|&(c, n)| (c.signum(), monomial(c.abs(), n))).collect();
    join_terms(&terms, spaced)
}

/// `k` times a function's text: `sin(x)`, `-cos(x)`, `3sin(x)`, `2x sin(x)` (a
/// coefficient that is only a number is written against the function; one with `x`
/// is separated by a space).
fn scaled(c: i64, n: u32, f: &str) -> String {
    if n == 0 {
        match c {
            1 => f.to_string(),
            -1 => format!("-{f}"),
            c => format!("{c}{f}"),
        }
    } else {
        format!("{} {f}", monomial(c, n))
    }
}

/// Distinct exponents from `0..=max_exp`, `n` of them, decreasing.
fn exponents(rng: &mut Rng, n: usize, max_exp: u32) -> Vec<u32> {
    let mut all: Vec<u32> = (0..=max_exp).collect();
    let mut out = vec![];
    for _ in 0..n.min(all.len()) {
        let i = rng.range(0, all.len() as i64 - 1) as usize;
        out.push(all.remove(i));
    }
    out.sort_unstable_by(|a, b| b.cmp(a));
    out
}

/// How people ask for a derivative of `f` (spaced text).
fn ask_derivative(rng: &mut Rng, f: &str) -> String {
    match rng.range(0, 5) {
        0 => format!("d/dx ({f})"),
        1 => format!("Differentiate {f}"),
        2 => format!("What is the derivative of {f}?"),
        3 => format!("Find f'(x) if f(x) = {f}"),
        4 => format!("Find the derivative of {f}"),
        _ => format!("d/dx {f}"),
    }
}

/// `d/dx` of a polynomial of degree up to 5, 2–5 terms: each term's derivative on its
/// own (`3x^4>12x^3`), then the sum.
pub fn derivative_polynomial(rng: &mut Rng) -> Problem {
    let n_terms = rng.range(2, 5) as usize;
    let exps = loop {
        let e = exponents(rng, n_terms, 5);
        if e[0] >= 2 {
            break e;
        }
    };
    let p: Poly = exps.iter().enumerate().map(|(i, &n)| (if i == 0 && rng.range(0, 3) != 0 { rng.range(1, 12) } else { nonzero(rng, -12, 12) }, n)).collect();
    let mut s = Steps::default();
    let mut d: Poly = vec![];
    for &(c, n) in &p {
        let dc = c * n as i64;
        s.note(format!("{}>{}", monomial(c, n), if n == 0 { "0".into() } else { monomial(dc, n - 1) }));
        if n > 0 {
            d.push((dc, n - 1));
        }
    }
    let q = ask_derivative(rng, &poly_text(&p, true));
    Problem::new(Kind::Derivative, q, s, Some(poly_text(&d, true)))
}

/// The functions a power may be multiplied by, and the chain rule's outer functions:
/// (name as written around an argument, derivative's sign and name).
const FUNCS: [(&str, i64, &str); 3] = [("sin", 1, "cos"), ("cos", -1, "sin"), ("e^", 1, "e^")];

/// A function applied to an argument's text: `sin(x)`, `e^x`, `e^(3x + 1)`.
fn apply(f: &str, arg: &str) -> String {
    if f == "e^" {
        if arg == "x" {
            "e^x".into()
        } else {
            format!("e^({arg})")
        }
    } else {
        format!("{f}({arg})")
    }
}

/// `d/dx (a·x^n · f(x))` for f in sin, cos, exp: the product rule,
/// `(u v)' = u' v + u v'` (`x^2 sin(x)` → `2x sin(x) + x^2 cos(x)`).
pub fn derivative_product(rng: &mut Rng) -> Problem {
    let a = if rng.range(0, 2) == 0 { rng.range(2, 6) } else { 1 };
    let n = rng.range(1, 4) as u32;
    let (f, sign, df) = FUNCS[rng.range(0, 2) as usize];
    let (v, dv) = (apply(f, "x"), apply(df, "x"));
    let u = monomial(a, n);
    let du = (a * n as i64, n - 1);
    let mut s = Steps::default();
    s.note(format!("u={u}"));
    s.note(format!("u'={}", monomial(du.0, du.1)));
    s.note(format!("v={v}"));
    s.note(format!("v'={}{dv}", if sign < 0 { "-" } else { "" }));
    let answer = join_terms(&[(1, scaled(du.0, du.1, &v)), (sign, scaled(a, n, &dv))], true);
    let q = ask_derivative(rng, &scaled(a, n, &v));
    Problem::new(Kind::Product, q, s, Some(answer))
}

/// `ax + b` as written (`3x + 1`, `-x + 4`, `2x`).
fn linear_text(a: i64, b: i64, spaced: bool) -> String {
    let mut terms = vec![(a.signum(), monomial(a.abs(), 1))];
    if b != 0 {
        terms.push((b.signum(), b.abs().to_string()));
    }
    join_terms(&terms, spaced)
}

/// `d/dx (k·f(ax + b))` for f in sin, cos, exp: the chain rule,
/// `(k f(g))' = k f'(g) g'` (`cos(3x + 1)` → `-3sin(3x + 1)`).
pub fn derivative_chain(rng: &mut Rng) -> Problem {
    let (f, sign, df) = FUNCS[rng.range(0, 2) as usize];
    let k = if rng.range(0, 2) == 0 { nonzero(rng, -5, 5) } else { 1 };
    let (a, b) = loop {
        let (a, b) = (nonzero(rng, -9, 9), rng.range(-9, 9));
        if a != 1 || b != 0 {
            break (a, b);
        }
    };
    let arg = linear_text(a, b, true);
    let mut s = Steps::default();
    s.note(format!("g={}", linear_text(a, b, false)));
    s.note(format!("g'={a}"));
    let r = s.mul(sign * k, a);
    let q = ask_derivative(rng, &scaled(k, 0, &apply(f, &arg)));
    Problem::new(Kind::Chain, q, s, Some(scaled(r, 0, &apply(df, &arg))))
}

/// A polynomial whose antiderivative has integer coefficients: each `c x^n` with `c` a
/// multiple of `n + 1`.
fn integrable(rng: &mut Rng, n_terms: usize, max_exp: u32, max_m: i64) -> Poly {
    let exps = exponents(rng, n_terms, max_exp);
    exps.iter().enumerate().map(|(i, &n)| (if i == 0 && rng.range(0, 2) != 0 { rng.range(1, max_m) } else { nonzero(rng, -max_m, max_m) } * (n as i64 + 1), n)).collect()
}

fn antiderivative(p: &Poly) -> Poly {
    p.iter().map(|&(c, n)| (c / (n as i64 + 1), n + 1)).collect()
}

/// `∫ p dx` for a polynomial of 1–4 terms, degree up to 4: each term's antiderivative
/// (`6x^2>2x^3`), then the sum and `+ C`.
pub fn integral_indefinite(rng: &mut Rng) -> Problem {
    let n_terms = rng.range(1, 4) as usize;
    let p = integrable(rng, n_terms, 4, 9);
    let big_f = antiderivative(&p);
    let mut s = Steps::default();
    for (&(c, n), &(fc, fn_)) in p.iter().zip(&big_f) {
        s.note(format!("{}>{}", monomial(c, n), monomial(fc, fn_)));
    }
    let f = poly_text(&p, true);
    let q = match rng.range(0, 4) {
        0 => format!("Integrate {f} dx"),
        1 => format!("∫ ({f}) dx"),
        2 => format!("What is the integral of {f}?"),
        3 => format!("Find the antiderivative of {f}"),
        _ => format!("∫ {f} dx"),
    };
    Problem::new(Kind::Integral, q, s, Some(format!("{} + C", poly_text(&big_f, true))))
}

/// `∫_a^b p dx` for a polynomial of 1–2 terms of degree up to 3 or 3 terms up to `x²`, integer limits
/// `-3 ≤ a < b ≤ 4`: the antiderivative, `F(b)` and `F(a)` term by term, and
/// `F(b) - F(a)`.
pub fn integral_definite(rng: &mut Rng) -> Problem {
    // three terms only up to x^2, so the work fits the model's context
    let n_terms = rng.range(1, 3) as usize;
    let p = integrable(rng, n_terms, if n_terms == 3 { 2 } else { 3 }, 4);
    let big_f = antiderivative(&p);
    let lo = rng.range(-3, 3);
    let hi = rng.range(lo + 1, 4);
    let mut s = Steps::default();
    s.note(format!("F={}", poly_text(&big_f, false)));
    let at = |s: &mut Steps, v: i64| {
        let mut total: Option<i64> = None;
        for &(m, k) in &big_f {
            if v == 0 {
                break;
            }
            let p = if k == 1 { v } else { s.pow(v, k) };
            let t = match m {
                1 => p,
                -1 => -p,
                m => s.mul_short(m, p),
            };
            total = Some(match total {
                None => t,
                Some(acc) => s.add(acc, t),
            });
        }
        let value = total.unwrap_or(0);
        s.note(format!("F({v})={value}"));
        value
    };
    let (fh, fl) = (at(&mut s, hi), at(&mut s, lo));
    s.sub(fh, fl);
    let f = poly_text(&p, true);
    let q = match rng.range(0, 4) {
        0 => format!("Evaluate the integral of {f} from {lo} to {hi}"),
        1 => format!("Integrate {f} from {lo} to {hi}"),
        2 => format!("∫_{lo}^{hi} ({f}) dx"),
        3 => format!("What is the integral of {f} from {lo} to {hi}?"),
        _ => format!("∫ from {lo} to {hi} of {f} dx"),
    };
    Problem::new(Kind::Definite, q, s, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_written_as_people_write_them() {
        let p: Poly = vec![(3, 4), (-2, 2), (7, 1), (-5, 0)];
        assert_eq!(poly_text(&p, true), "3x^4 - 2x^2 + 7x - 5");
        assert_eq!(poly_text(&p, false), "3x^4-2x^2+7x-5");
        assert_eq!(poly_text(&vec![(-1, 2), (1, 1)], true), "-x^2 + x");
        assert_eq!(scaled(2, 1, "sin(x)"), "2x sin(x)");
        assert_eq!(scaled(-3, 0, "sin(3x + 1)"), "-3sin(3x + 1)");
        assert_eq!(apply("e^", "x"), "e^x");
        assert_eq!(linear_text(-1, 4, true), "-x + 4");
    }
}
