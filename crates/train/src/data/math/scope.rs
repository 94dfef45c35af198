//! Which questions the math model was trained to answer. A question outside them gets a
//! one-line refusal instead of a made-up answer.
//!
//! This reads the *form* of the question only (the canonical text of
//! [`super::normalize::normalize_question`] parsed as notation): which operations, how
//! many, how large the numbers, which functions. It computes no answer; the one
//! exception is a quadratic, whose discriminant is checked to be a square so that a
//! question without integer roots is refused (checking is cheaper than solving).

use super::normalize::normalize_question;
use super::notation::{parse, Node};
use super::Kind;

/// Why a question is out of scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutOfScope(pub String);

impl std::fmt::Display for OutOfScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the model answers, for refusals.
pub const TRAINED_ON: &str = "arithmetic on numbers up to 3 digits (+, -, ×, ÷ by 2–12, expressions of up to 4 operations), \
linear and quadratic equations, systems of two linear equations, derivatives of polynomials / x^n·sin, cos, e^x / sin, cos, e^ of ax + b, \
integrals of polynomials, and one-step word problems";

fn refuse<T>(why: impl Into<String>) -> Result<T, OutOfScope> {
    Err(OutOfScope(why.into()))
}

/// The kind of problem a question is, or why the model cannot answer it.
pub fn classify(question: &str) -> Result<Kind, OutOfScope> {
    let q = normalize_question(question);
    if q.is_empty() {
        return refuse("the question is empty");
    }
    // Bounds every number below, so no check here can overflow.
    if q.split(|c: char| !c.is_ascii_digit()).any(|run| run.len() > 6) {
        return refuse("the model was trained on numbers of at most 4 digits");
    }
    if let Some(f) = q.strip_prefix("d/dx(").and_then(|r| r.strip_suffix(')')) {
        return derivative(f);
    }
    if let Some(f) = q.strip_prefix("int(").and_then(|r| r.strip_suffix(")dx")) {
        let p = poly(f, "integrand")?;
        return integrable(&p, 4, 9).map(|_| Kind::Integral);
    }
    if let Some(rest) = q.strip_prefix("int[") {
        let (limits, f) = rest.split_once("](").ok_or_else(|| OutOfScope("the integral's limits are not readable".into()))?;
        let f = f.strip_suffix(")dx").unwrap_or(f);
        let (lo, hi) = limits.split_once(',').ok_or_else(|| OutOfScope("the integral needs two limits".into()))?;
        let (lo, hi): (i64, i64) = match (lo.parse(), hi.parse()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return refuse("the model integrates between integer limits only"),
        };
        if !(-3..=4).contains(&lo) || !(-3..=4).contains(&hi) || lo >= hi {
            return refuse("the model was trained on limits from -3 to 4, the lower one first");
        }
        let p = poly(f, "integrand")?;
        return integrable(&p, 3, 4).map(|_| Kind::Definite);
    }
    if q.contains('=') {
        return equation(&q);
    }
    if q.contains("how many") {
        let numbers = q.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).count();
        return if numbers == 2 { Ok(Kind::Word) } else { refuse("the model answers word problems with exactly two numbers") };
    }
    let e = parse(&q).map_err(|_| OutOfScope(format!("not a kind of question this model was trained on; it answers {TRAINED_ON}")))?;
    arithmetic(&e)
}

fn poly(f: &str, what: &str) -> Result<Vec<i64>, OutOfScope> {
    let e = parse(f).map_err(|why| OutOfScope(format!("the {what} is not readable: {why}")))?;
    e.polynomial().ok_or_else(|| OutOfScope(format!("the model integrates and differentiates polynomials in x (and the few forms listed); `{f}` is not one")))
}

/// Degree ≤ `max_deg`, at most 4 terms, each coefficient a multiple of (exponent + 1)
/// with that multiple at most `max_m` in size (antiderivatives with integer
/// coefficients, as trained).
fn integrable(p: &[i64], max_deg: usize, max_m: i64) -> Result<(), OutOfScope> {
    let terms = p.iter().filter(|&&c| c != 0).count();
    if p.len() > max_deg + 1 || terms == 0 || terms > 4 {
        return refuse(format!("the model integrates polynomials of up to 4 terms and degree {max_deg} here"));
    }
    for (n, &c) in p.iter().enumerate() {
        if c % (n as i64 + 1) != 0 || (c / (n as i64 + 1)).abs() > max_m {
            return refuse("the model was trained on integrands whose antiderivatives have small integer coefficients (like 6x^2 + 4x)");
        }
    }
    Ok(())
}

fn derivative(f: &str) -> Result<Kind, OutOfScope> {
    let e = parse(f).map_err(|why| OutOfScope(format!("the function is not readable: {why}")))?;
    if let Some(p) = e.polynomial() {
        let terms = p.iter().filter(|&&c| c != 0).count();
        if p.len() > 6 || terms > 5 || p.iter().any(|c| c.abs() > 12) {
            return refuse("the model differentiates polynomials of degree up to 5 with up to 5 terms and coefficients up to 12");
        }
        return Ok(Kind::Derivative);
    }
    // a·x^n · f(x), f ∈ sin, cos, e^x
    for (suffix, kind) in [("sin(x)", Kind::Product), ("cos(x)", Kind::Product), ("e^x", Kind::Product)] {
        if let Some(u) = f.strip_suffix(suffix) {
            if let Ok(p) = parse(u).map(|u| u.polynomial()) {
                let p = p.unwrap_or_default();
                let terms: Vec<(usize, i64)> = p.iter().copied().enumerate().filter(|t| t.1 != 0).collect();
                if let [(n, a)] = terms[..] {
                    if (1..=4).contains(&n) && (1..=6).contains(&a) {
                        return Ok(kind);
                    }
                }
                return refuse("the model differentiates a·x^n times sin(x), cos(x) or e^x for a from 1 to 6 and n from 1 to 4");
            }
        }
    }
    // k·f(ax + b), f ∈ sin, cos, e^
    for head in ["sin(", "cos(", "e^("] {
        if let Some(at) = f.find(head) {
            let k = &f[..at];
            let k: i64 = match k {
                "" => 1,
                "-" => -1,
                k => k.parse().map_err(|_| OutOfScope("the model applies the chain rule to k·sin, k·cos or k·e^ of ax + b with a whole number k".into()))?,
            };
            let arg = f[at + head.len()..].strip_suffix(')').unwrap_or("");
            let lin = parse(arg).ok().and_then(|a| a.polynomial()).unwrap_or_default();
            let ok = (1..=2).contains(&lin.len()) && lin.get(1).is_some_and(|a| (1..=9).contains(&a.abs())) && lin[0].abs() <= 9 && (-5..=5).contains(&k) && k != 0;
            return if ok { Ok(Kind::Chain) } else { refuse("the model applies the chain rule to k·sin, k·cos or k·e^ of ax + b with |k| ≤ 5, |a| ≤ 9, |b| ≤ 9") };
        }
    }
    refuse("the model differentiates polynomials, a·x^n times sin(x), cos(x) or e^x, and sin, cos or e^ of ax + b; not this function")
}

/// Linear in `x` (one equation), quadratic in `x` (`= 0` or any two sides), or two
/// linear equations in `x` and `y`.
fn equation(q: &str) -> Result<Kind, OutOfScope> {
    let sides = |eq: &str| -> Result<(Node, Node), OutOfScope> {
        let (l, r) = eq.split_once('=').ok_or_else(|| OutOfScope("an equation needs `=`".into()))?;
        if r.contains('=') {
            return refuse("an equation with more than one `=`");
        }
        let read = |s: &str| parse(s).map_err(|why| OutOfScope(format!("the equation is not readable: {why}")));
        Ok((read(l)?, read(r)?))
    };
    if let Some((e1, e2)) = q.split_once(',') {
        for eq in [e1, e2] {
            let (l, r) = sides(eq)?;
            let lin = |n: &Node| linear_xy(n).ok_or_else(|| OutOfScope("the model solves systems of two linear equations in x and y with coefficients from -5 to 5".into()));
            let (a, b) = (lin(&l)?, lin(&r)?);
            if (0..2).any(|i| !(-5..=5).contains(&(a[i] - b[i]))) {
                return refuse("the model solves systems with coefficients from -5 to 5");
            }
        }
        return Ok(Kind::System);
    }
    let (l, r) = sides(q)?;
    if l.has_var('y') || r.has_var('y') {
        return refuse("an equation in y alone, or with x and y, needs a second equation (systems of two)");
    }
    let (lp, rp) = match (l.polynomial(), r.polynomial()) {
        (Some(a), Some(b)) => (a, b),
        _ => return refuse("the model solves polynomial equations in x of degree 1 and 2 only"),
    };
    let mut p = vec![0i64; lp.len().max(rp.len())];
    for (i, v) in lp.iter().enumerate() {
        p[i] += v;
    }
    for (i, v) in rp.iter().enumerate() {
        p[i] -= v;
    }
    while p.len() > 1 && p.last() == Some(&0) {
        p.pop();
    }
    match p.len() {
        2 => {
            if p[1].abs() > 12 || p[0].abs() > 400 {
                return refuse("the model solves ax + b = c with |a| ≤ 12 and numbers up to 3 digits");
            }
            if p[0] % p[1] != 0 {
                return refuse("the model was trained on linear equations with whole-number solutions");
            }
            Ok(Kind::Equation)
        }
        3 => {
            let (c, b, a) = (p[0], p[1], p[2]);
            if ![1, 2, 3, -1].contains(&a) || b % a != 0 || c % a != 0 {
                return refuse("the model was trained on quadratics x^2 + bx + c (or 2, 3 or -1 times one)");
            }
            let (b, c) = (b / a, c / a);
            let d = b * b - 4 * c;
            let root = (d.max(0) as f64).sqrt().round() as i64;
            if d < 0 || root * root != d || (b + root) % 2 != 0 || (-b - root).abs() > 18 || (-b + root).abs() > 18 {
                return refuse("the model was trained on quadratics whose roots are whole numbers from -9 to 9");
            }
            Ok(Kind::Quadratic)
        }
        _ => refuse("the model solves polynomial equations in x of degree 1 and 2 only"),
    }
}

/// `[a, b, c]` for `a·x + b·y + c`, when the expression is one.
fn linear_xy(n: &Node) -> Option<[i64; 3]> {
    Some(match n {
        Node::Num(v) => [0, 0, *v],
        Node::Var('x') => [1, 0, 0],
        Node::Var('y') => [0, 1, 0],
        Node::Neg(a) => linear_xy(a)?.map(|v| -v),
        Node::Bin(a, op @ ('+' | '-'), b) => {
            let (a, b) = (linear_xy(a)?, linear_xy(b)?);
            let s = if *op == '+' { 1 } else { -1 };
            [a[0] + s * b[0], a[1] + s * b[1], a[2] + s * b[2]]
        }
        Node::Bin(a, '*', b) => {
            let (l, r) = (linear_xy(a)?, linear_xy(b)?);
            match (l, r) {
                ([0, 0, k], v) | (v, [0, 0, k]) => v.map(|x| k * x),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// Numbers, `+ - * /` and parentheses: one division `a / b` (b from 2 to 12, a up to 4
/// digits), one `+ - *` on numbers up to 3 digits, or 2–4 operations on numbers up to
/// 2 digits.
fn arithmetic(e: &Node) -> Result<Kind, OutOfScope> {
    fn walk(n: &Node, ops: &mut Vec<char>, nums: &mut Vec<i64>) -> Result<(), OutOfScope> {
        match n {
            Node::Num(v) => nums.push(*v),
            Node::Neg(a) => match &**a {
                Node::Num(v) => nums.push(-v),
                _ => return refuse("the model negates numbers only, not expressions"),
            },
            Node::Bin(a, op @ ('+' | '-' | '*' | '/'), b) => {
                ops.push(*op);
                walk(a, ops, nums)?;
                walk(b, ops, nums)?;
            }
            _ => return refuse(format!("not a kind of question this model was trained on; it answers {TRAINED_ON}")),
        }
        Ok(())
    }
    let (mut ops, mut nums) = (vec![], vec![]);
    walk(e, &mut ops, &mut nums)?;
    let max = nums.iter().map(|v| v.abs()).max().unwrap_or(0);
    if ops.contains(&'/') {
        if ops.len() > 1 {
            return refuse("the model divides two numbers only (no division inside longer expressions)");
        }
        if nums[1] == 0 {
            return refuse("division by zero is undefined");
        }
        if !(2..=12).contains(&nums[1]) || !(0..=9999).contains(&nums[0]) {
            return refuse("the model divides whole numbers up to 9999 by 2 to 12");
        }
        return Ok(Kind::Div);
    }
    match ops.len() {
        0 => refuse("a number alone is not a question"),
        1 if max > 999 => refuse("the model was trained on numbers up to 3 digits"),
        1 => Ok(match ops[0] {
            '+' => Kind::Add,
            '-' => Kind::Sub,
            _ => Kind::Mul,
        }),
        2..=4 if max > 99 => refuse("in expressions of several operations the model was trained on numbers up to 2 digits"),
        2..=4 => Ok(Kind::Expr),
        _ => refuse("the model was trained on expressions of up to 4 operations"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_in_scope_are_classified() {
        for kind in Kind::ALL {
            assert_eq!(classify(kind.example()), Ok(kind), "{}", kind.example());
        }
        assert_eq!(classify("15 - (-8)"), Ok(Kind::Sub));
        assert_eq!(classify("Find the roots of x^2 - 4"), Ok(Kind::Quadratic));
    }

    #[test]
    fn questions_out_of_scope_are_refused_with_a_reason() {
        for q in ["what is love", "1/0", "integrate sin(x)^2 dx", "Integrate x^2 dx", "12345 + 67890", "d/dx tan(x)", "Solve x^2 + 1 = 0", "Solve x^2 - 2 = 0", "2x + 3y = 5", "x^3 = 8", "", "hello, world", "7"] {
            let r = classify(q);
            assert!(r.is_err(), "{q} → {r:?}");
        }
        assert_eq!(classify("1/0").unwrap_err().0, "division by zero is undefined");
    }
}
