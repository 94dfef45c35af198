//! Whether a produced answer is the expected one, compared as mathematics rather than
//! as text: integers as numbers, expressions as functions (equal at several points, the
//! constant of integration included), roots and solutions as sets of assignments,
//! quotients with their remainders.

use super::notation::parse;

/// Points at which two expressions in `x` (and `C`) must agree.
const XS: [f64; 6] = [-1.7, -0.6, 0.3, 0.9, 1.4, 2.2];
/// The value given to the constant of integration `C` (any value not special).
const C_VALUE: f64 = 0.771;

/// `x = 2 or x = 3`, `x = 3, y = 1`: the assignments, sorted.
fn assignments(s: &str) -> Option<Vec<(char, i64)>> {
    let mut out = vec![];
    for part in s.split(" or ").flat_map(|p| p.split(',')) {
        let (var, value) = part.split_once('=')?;
        let var = var.trim();
        let v = var.chars().next().filter(|_| var.len() == 1)?;
        out.push((v, value.trim().parse().ok()?));
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// `14 remainder 2` (or `14 r 2`, `14 R 2`): the quotient and remainder.
fn quotient(s: &str) -> Option<(i64, i64)> {
    let lower = s.to_lowercase();
    let (q, r) = lower.split_once("remainder").or_else(|| lower.split_once(" r "))?;
    Some((q.trim().parse().ok()?, r.trim().parse().ok()?))
}

/// Whether `got` equals `expected` as mathematics (see the module docs).
pub fn answers_match(got: &str, expected: &str) -> bool {
    let clean = |s: &str| s.trim().trim_end_matches('.').to_string();
    let (g, e) = (clean(got), clean(expected));
    if let (Ok(a), Ok(b)) = (g.trim_start_matches("x =").trim().parse::<i64>(), e.trim_start_matches("x =").trim().parse::<i64>()) {
        return a == b;
    }
    if let Some(qe) = quotient(&e) {
        return quotient(&g) == Some(qe);
    }
    if e.contains('=') {
        return assignments(&e).is_some() && assignments(&g) == assignments(&e);
    }
    match (parse(&g), parse(&e)) {
        (Ok(a), Ok(b)) => {
            // An antiderivative without its constant is not the answer.
            if b.has_var('C') != a.has_var('C') {
                return false;
            }
            XS.iter().all(|&x| {
                let (u, v) = (a.eval(x, 0.0, C_VALUE), b.eval(x, 0.0, C_VALUE));
                (u - v).abs() <= 1e-9 * v.abs().max(1.0)
            })
        }
        _ => g.split_whitespace().collect::<String>() == e.split_whitespace().collect::<String>(),
    }
}

#[cfg(test)]
mod tests {
    use super::answers_match as m;

    #[test]
    fn equal_mathematics_matches_and_different_does_not() {
        assert!(m("4234", "4234"));
        assert!(m("x = -7", "-7"));
        assert!(!m("4243", "4234"));
        assert!(m("12x^3 - 4x + 7", "12x^3 - 4x + 7"));
        assert!(m("7 - 4x + 12x^3", "12x^3 - 4x + 7"));
        assert!(!m("12x^3 - 4x", "12x^3 - 4x + 7"));
        assert!(m("2x sin(x) + x^2 cos(x)", "x^2 cos(x) + 2x sin(x)"));
        assert!(!m("2x sin(x) - x^2 cos(x)", "2x sin(x) + x^2 cos(x)"));
        assert!(m("-3sin(3x + 1)", "-3 sin(3x+1)"));
        assert!(m("2x^3 + 2x^2 + C", "2x^3 + 2x^2 + C"));
        assert!(!m("2x^3 + 2x^2", "2x^3 + 2x^2 + C"), "the constant of integration is part of the answer");
        assert!(m("x = 3 or x = 2", "x = 2 or x = 3"));
        assert!(!m("x = 2", "x = 2 or x = 3"));
        assert!(m("x = 3", "x = 3"));
        assert!(m("x = 3, y = 1", "x = 3, y = 1"));
        assert!(!m("x = 3, y = 2", "x = 3, y = 1"));
        assert!(m("14 remainder 2", "14 remainder 2"));
        assert!(!m("14", "14 remainder 2"));
        assert!(!m("", "7"));
        assert!(!m("what", "7"));
    }
}
