//! Equations: linear in one unknown, quadratics with integer roots, and systems of two
//! linear equations with integer solutions.

use super::calculus::{join_terms, poly_text};
use super::steps::Steps;
use super::{nonzero, Kind, Problem};
use ultramoe_model::init::Rng;

/// `a·v` for a variable `v`: `2x`, `-y`, `x`.
fn term(a: i64, v: char) -> (i64, String) {
    (a.signum(), if a.abs() == 1 { v.to_string() } else { format!("{}{v}", a.abs()) })
}

/// `ax + b = c` with integer `x`: `c - b`, then the quotient.
pub fn linear(rng: &mut Rng) -> Problem {
    let a = nonzero(rng, -12, 12);
    let x = rng.range(-20, 20);
    let b = nonzero(rng, -99, 99);
    let c = a * x + b;
    let lhs = if rng.range(0, 3) == 0 {
        // constant first: b + ax, b - |a|x
        join_terms(&[(b.signum(), b.abs().to_string()), term(a, 'x')], true)
    } else {
        join_terms(&[term(a, 'x'), (b.signum(), b.abs().to_string())], true)
    };
    let q = match rng.range(0, 2) {
        0 => format!("Solve for x: {lhs} = {c}"),
        1 => format!("{lhs} = {c}"),
        _ => format!("Solve {lhs} = {c}"),
    };
    let mut s = Steps::default();
    let r = s.sub(c, b);
    s.div(r, a);
    Problem::new(Kind::Equation, q, s, None)
}

/// `ax² + bx + c = 0` with integer roots between -9 and 9 (`a` 1 most of the time):
/// divide by `a`, then the discriminant `D = b² - 4c`, `√D`, and `x = (-b ∓ √D) / 2`
/// (smallest first; a double root once).
pub fn quadratic(rng: &mut Rng) -> Problem {
    let (r1, r2) = {
        let (u, v) = (rng.range(-9, 9), rng.range(-9, 9));
        (u.min(v), u.max(v))
    };
    let a = [1, 1, 1, 1, 1, 2, 3, -1][rng.range(0, 7) as usize];
    let (b, c) = (-(r1 + r2), r1 * r2);
    let eq: Vec<(i64, u32)> = [(a, 2), (a * b, 1), (a * c, 0)].into_iter().filter(|t| t.0 != 0).collect();
    let text = poly_text(&eq, true);
    let q = match rng.range(0, 4) {
        0 => format!("Solve {text} = 0"),
        1 => format!("{text} = 0"),
        2 => format!("Find the roots of {text}"),
        3 => format!("What are the solutions of {text} = 0?"),
        _ => format!("Solve for x: {text} = 0"),
    };
    let mut s = Steps::default();
    if a != 1 {
        let monic: Vec<(i64, u32)> = [(1, 2), (b, 1), (c, 0)].into_iter().filter(|t| t.0 != 0).collect();
        s.note(format!("/{a}:{}=0", poly_text(&monic, false)));
    }
    let b2 = s.pow(b.abs(), 2);
    let c4 = s.mul(c, 4);
    let d = s.sub(b2, c4);
    let root = (d as f64).sqrt().round() as i64;
    s.note(format!("sqrt({d})={root}"));
    let answer = if root == 0 {
        s.div(-b, 2);
        format!("x = {r1}")
    } else {
        let lo = s.sub(-b, root);
        s.div(lo, 2);
        let hi = s.add(-b, root);
        s.div(hi, 2);
        format!("x = {r1} or x = {r2}")
    };
    Problem::new(Kind::Quadratic, q, s, Some(answer))
}

/// Two linear equations in `x` and `y` with integer solutions between -9 and 9 and
/// coefficients between -5 and 5, by Cramer's rule: `D = a₁b₂ - a₂b₁`,
/// `D_x = c₁b₂ - c₂b₁`, `D_y = a₁c₂ - a₂c₁`, `x = D_x / D`, `y = D_y / D` (|D| ≤ 12 so
/// the quotients come from the times table).
pub fn system(rng: &mut Rng) -> Problem {
    let (a1, b1, a2, b2) = loop {
        let v = (nonzero(rng, -5, 5), nonzero(rng, -5, 5), nonzero(rng, -5, 5), nonzero(rng, -5, 5));
        let d = v.0 * v.3 - v.2 * v.1;
        if d != 0 && d.abs() <= 12 {
            break v;
        }
    };
    let (x, y) = (rng.range(-9, 9), rng.range(-9, 9));
    let (c1, c2) = (a1 * x + b1 * y, a2 * x + b2 * y);
    let eq = |a: i64, b: i64, c: i64| format!("{} = {c}", join_terms(&[term(a, 'x'), term(b, 'y')], true));
    let (e1, e2) = (eq(a1, b1, c1), eq(a2, b2, c2));
    let q = match rng.range(0, 3) {
        0 => format!("Solve: {e1}, {e2}"),
        1 => format!("Solve the system {e1} and {e2}"),
        2 => format!("Find x and y if {e1} and {e2}"),
        _ => format!("{e1}, {e2}"),
    };
    let mut s = Steps::default();
    let det = |s: &mut Steps, name: &str, (p, q): (i64, i64), (r, t): (i64, i64)| {
        let u = s.mul(p, q);
        let v = s.mul(r, t);
        let d = s.sub(u, v);
        s.note(format!("{name}={d}"));
        d
    };
    let d = det(&mut s, "D", (a1, b2), (a2, b1));
    let dx = det(&mut s, "Dx", (c1, b2), (c2, b1));
    let dy = det(&mut s, "Dy", (c2, a1), (c1, a2));
    s.div(dx, d);
    s.div(dy, d);
    Problem::new(Kind::System, q, s, Some(format!("x = {x}, y = {y}")))
}
