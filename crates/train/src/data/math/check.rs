//! Checking a candidate answer where checking is cheaper than solving and computes no
//! answer: roots and solutions substituted into the equations the question gives, a
//! quotient and remainder multiplied back, an antiderivative differentiated
//! (numerically, by central differences) and compared with the integrand. Other kinds
//! have no check.

use super::normalize::normalize_question;
use super::notation::{parse, Node};
use super::scope::classify;
use super::Kind;

/// Whether `answer` passes the check for `question`'s kind (`None`: the kind has no
/// check, or the question is out of scope).
pub fn verify(question: &str, answer: &str) -> Option<bool> {
    let kind = classify(question).ok()?;
    let q = normalize_question(question);
    let ok = match kind {
        Kind::Equation | Kind::Quadratic | Kind::System => substitute(&q, answer, kind),
        Kind::Div => multiply_back(&q, answer),
        Kind::Integral => differentiate_back(&q, answer),
        _ => return None,
    };
    Some(ok.unwrap_or(false))
}

/// `x = 2 or x = 3` / `x = 3, y = 1` / `-7`: each value substituted into every equation.
fn substitute(q: &str, answer: &str, kind: Kind) -> Option<bool> {
    let mut values: Vec<(char, i64)> = vec![];
    for part in answer.split(" or ").flat_map(|p| p.split(',')) {
        let (var, v) = part.split_once('=').unwrap_or(("x", part));
        values.push((var.trim().chars().next()?, v.trim().parse().ok()?));
    }
    let equations: Vec<(Node, Node)> = q
        .split(',')
        .map(|e| {
            let (l, r) = e.split_once('=')?;
            Some((parse(l).ok()?, parse(r).ok()?))
        })
        .collect::<Option<_>>()?;
    let holds = |x: f64, y: f64| equations.iter().all(|(l, r)| l.eval(x, y, 0.0) == r.eval(x, y, 0.0));
    Some(match kind {
        Kind::System => {
            let x = values.iter().find(|v| v.0 == 'x')?.1 as f64;
            let y = values.iter().find(|v| v.0 == 'y')?.1 as f64;
            values.len() == 2 && holds(x, y)
        }
        // every root given must satisfy the equation; a quadratic's second root is not
        // required by the check (a double root is written once)
        _ => !values.is_empty() && values.iter().all(|&(v, x)| v == 'x' && holds(x as f64, 0.0)),
    })
}

/// `a / b` answered `q` or `q remainder r`: `q·b + r = a` with `0 ≤ r < b`.
fn multiply_back(q: &str, answer: &str) -> Option<bool> {
    let (a, b) = q.split_once('/')?;
    let (a, b): (i64, i64) = (a.parse().ok()?, b.parse().ok()?);
    let (quot, r) = match answer.split_once("remainder") {
        Some((x, y)) => (x.trim().parse::<i64>().ok()?, y.trim().parse::<i64>().ok()?),
        None => (answer.trim().parse().ok()?, 0),
    };
    Some(quot * b + r == a && (0..b).contains(&r))
}

/// `F + C` differentiated by central differences equals the integrand at a few points.
fn differentiate_back(q: &str, answer: &str) -> Option<bool> {
    let f = parse(q.strip_prefix("int(")?.strip_suffix(")dx")?).ok()?;
    let big_f = parse(answer).ok()?;
    if !big_f.has_var('C') {
        return Some(false);
    }
    let h = 1e-4;
    Some([-1.1, -0.3, 0.4, 1.2].iter().all(|&x| {
        let d = (big_f.eval(x + h, 0.0, 0.0) - big_f.eval(x - h, 0.0, 0.0)) / (2.0 * h);
        let want = f.eval(x, 0.0, 0.0);
        (d - want).abs() <= 1e-5 * want.abs().max(1.0) * 10.0
    }))
}

#[cfg(test)]
mod tests {
    use super::verify;

    #[test]
    fn right_answers_pass_and_wrong_ones_fail() {
        assert_eq!(verify("Solve x^2 - 5x + 6 = 0", "x = 2 or x = 3"), Some(true));
        assert_eq!(verify("Solve x^2 - 5x + 6 = 0", "x = 2 or x = 4"), Some(false));
        assert_eq!(verify("Solve: 2x + y = 7, x - y = 2", "x = 3, y = 1"), Some(true));
        assert_eq!(verify("Solve: 2x + y = 7, x - y = 2", "x = 3, y = 2"), Some(false));
        assert_eq!(verify("Solve for x: -4x + 9 = -31", "10"), Some(true));
        assert_eq!(verify("Solve for x: -4x + 9 = -31", "-10"), Some(false));
        assert_eq!(verify("100 / 7", "14 remainder 2"), Some(true));
        assert_eq!(verify("100 / 7", "14"), Some(false));
        assert_eq!(verify("Integrate 6x^2 + 4x dx", "2x^3 + 2x^2 + C"), Some(true));
        assert_eq!(verify("Integrate 6x^2 + 4x dx", "2x^3 + 2x^2"), Some(false));
        assert_eq!(verify("Integrate 6x^2 + 4x dx", "2x^3 + 4x^2 + C"), Some(false));
        assert_eq!(verify("347 + 589", "936"), None);
        assert_eq!(verify("what is love", "42"), None);
    }
}
