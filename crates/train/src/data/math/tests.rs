//! Every kind's answers checked by means independent of the generators: the question
//! text parsed as notation and evaluated, differentiated and integrated numerically,
//! roots and solutions substituted back.

use super::grade::answers_match;
use super::normalize::normalize_question;
use super::notation::{parse, Node};
use super::scope::classify;
use super::*;

/// Every step of the form `a op b = r` (op `+ - * /`, `/` also as `n/b=qrm`) and
/// `v^k = r` is arithmetically right.
fn check_steps(worked: &str) {
    let steps = worked.split('|').next().unwrap();
    for step in steps.split(';') {
        let Some((lhs, rhs)) = step.split_once('=') else { continue };
        if lhs.is_empty() || lhs.chars().any(|c| c.is_ascii_alphabetic() && c != 'r') || rhs.contains('=') {
            continue;
        }
        if let Some((qd, r)) = rhs.split_once('r') {
            let (a, b) = lhs.split_once('/').unwrap();
            let (a, b, qd, r): (i64, i64, i64, i64) = (a.parse().unwrap(), b.parse().unwrap(), qd.parse().unwrap(), r.parse().unwrap());
            assert!(qd * b + r == a && (0..b).contains(&r) && (0..10).contains(&qd), "step {step} in {worked}");
            continue;
        }
        let Ok(r) = rhs.parse::<i64>() else { continue };
        let Ok(e) = parse(lhs) else { continue };
        assert_eq!(e.eval(0.0, 0.0, 0.0), r as f64, "step {step} in {worked}");
    }
}

/// The function in `d/dx(F)`, `int(F)dx`, `int[a,b](F)dx`.
fn inner(q: &str, open: &str, close: &str) -> Node {
    let f = &q[q.find(open).unwrap() + open.len()..q.len() - close.len()];
    parse(f).unwrap_or_else(|e| panic!("{q}: {e}"))
}

fn derivative_at(f: &Node, x: f64) -> f64 {
    let h = 1e-5;
    (f.eval(x + h, 0.0, 0.0) - f.eval(x - h, 0.0, 0.0)) / (2.0 * h)
}

#[test]
fn every_kind_is_right_by_independent_means() {
    let mut rng = Rng::new(11);
    for kind in Kind::ALL {
        for _ in 0..400 {
            let p = generate(&mut rng, kind);
            check_steps(&p.worked);
            assert_eq!(final_answer(&p.worked), p.answer);
            assert_eq!(classify(&p.question), Ok(kind), "{} is in scope", p.question);
            let q = normalize_question(&p.question);
            let ans = parse(&p.answer);
            match kind {
                Kind::Add | Kind::Sub | Kind::Mul | Kind::Expr => {
                    assert_eq!((parse(&q).unwrap().eval(0.0, 0.0, 0.0) as i64).to_string(), p.answer, "{}", p.question)
                }
                Kind::Div => {
                    let (a, b) = q.split_once('/').unwrap();
                    let (a, b): (i64, i64) = (a.parse().unwrap(), b.parse().unwrap());
                    let expect = if a % b == 0 { format!("{}", a / b) } else { format!("{} remainder {}", a / b, a % b) };
                    assert_eq!(p.answer, expect);
                }
                Kind::Equation => {
                    let (l, r) = q.split_once('=').unwrap();
                    let x: f64 = p.answer.parse().unwrap();
                    assert_eq!(parse(l).unwrap().eval(x, 0.0, 0.0), parse(r).unwrap().eval(x, 0.0, 0.0), "{}", p.question);
                }
                Kind::Word => assert!(p.answer.parse::<i64>().is_ok()),
                Kind::Derivative | Kind::Product | Kind::Chain => {
                    let f = inner(&q, "d/dx(", ")");
                    let d = ans.unwrap_or_else(|e| panic!("{}: {e}", p.answer));
                    for x in [-1.3, -0.4, 0.2, 0.8, 1.5] {
                        let (num, got) = (derivative_at(&f, x), d.eval(x, 0.0, 0.0));
                        assert!((num - got).abs() <= 1e-5 * num.abs().max(1.0), "{} → {} at {x}: {num} vs {got}", p.question, p.answer);
                    }
                }
                Kind::Integral => {
                    let f = inner(&q, "int(", ")dx");
                    let big_f = ans.unwrap();
                    assert!(p.answer.ends_with(" + C"), "{}", p.answer);
                    for x in [-1.3, -0.4, 0.2, 0.8, 1.5] {
                        let (num, want) = (derivative_at(&big_f, x), f.eval(x, 0.0, 0.0));
                        assert!((num - want).abs() <= 1e-4 * want.abs().max(1.0), "{} → {}", p.question, p.answer);
                    }
                }
                Kind::Definite => {
                    let (lo, hi) = q["int[".len()..q.find(']').unwrap()].split_once(',').unwrap();
                    let (lo, hi): (f64, f64) = (lo.parse().unwrap(), hi.parse().unwrap());
                    let f = inner(&q, "](", ")dx");
                    // Simpson's rule is exact for cubics
                    let n = 64;
                    let h = (hi - lo) / n as f64;
                    let sum: f64 = (0..=n).map(|i| f.eval(lo + i as f64 * h, 0.0, 0.0) * if i == 0 || i == n { 1.0 } else if i % 2 == 1 { 4.0 } else { 2.0 }).sum();
                    assert!((sum * h / 3.0 - p.answer.parse::<f64>().unwrap()).abs() < 1e-6, "{} → {}", p.question, p.answer);
                }
                Kind::Quadratic => {
                    let lhs = parse(q.strip_suffix("=0").unwrap()).unwrap();
                    let roots: Vec<f64> = p.answer.split(" or ").map(|r| r.trim_start_matches("x = ").parse().unwrap()).collect();
                    assert!(roots.windows(2).all(|w| w[0] < w[1]), "smallest first: {}", p.answer);
                    for r in &roots {
                        assert_eq!(lhs.eval(*r, 0.0, 0.0), 0.0, "{} → {}", p.question, p.answer);
                    }
                    // one root exactly when the discriminant is zero
                    let c = lhs.polynomial().unwrap();
                    assert_eq!(roots.len() == 1, c[1] * c[1] == 4 * c[0] * c[2], "{} → {}", p.question, p.answer);
                }
                Kind::System => {
                    let (x, y) = p.answer.split_once(", ").unwrap();
                    let (x, y): (f64, f64) = (x.trim_start_matches("x = ").parse().unwrap(), y.trim_start_matches("y = ").parse().unwrap());
                    for eq in q.split(',') {
                        let (l, r) = eq.split_once('=').unwrap();
                        assert_eq!(parse(l).unwrap().eval(x, y, 0.0), parse(r).unwrap().eval(x, y, 0.0), "{}", p.question);
                    }
                }
            }
            assert!(answers_match(&p.answer, &p.answer));
            let tokens = crate::data::batch::example_tokens(&p.question, &p.worked).0.len();
            assert!(tokens <= 240, "{} tokens: {} → {}", tokens, p.question, p.worked);
        }
    }
}

#[test]
fn splits_are_disjoint_and_held_out_is_a_tenth() {
    let mut rng = Rng::new(5);
    let test: Vec<Problem> = (0..200).map(|_| generate_in(&mut rng, Kind::Mul, Split::Test)).collect();
    assert!(test.iter().all(|p| split_of(&p.question) == Split::Test));
    assert_eq!(split_of("58 x 73"), split_of("58*73"), "surface forms share a split");
    assert_eq!(split_of("Differentiate x^2 sin(x)"), split_of("d/dx (x² sin(x))"));
    let n_test = (0..2000).filter(|_| split_of(&generate(&mut rng, Kind::Add).question) == Split::Test).count();
    assert!((120..280).contains(&n_test), "{n_test} of 2000 held out");
}

#[test]
fn digit_reversal_is_an_involution() {
    let s = "31+9=40;=-40;-40/-4=10|x = 10";
    assert_eq!(to_model_digits(s), "13+9=04;=-04;-04/-4=01|x = 01");
    assert_eq!(to_model_digits(&to_model_digits(s)), s);
}

#[test]
fn examples_are_written_as_the_issue_writes_them() {
    // the worked answer's last part, for questions whose generated form is fixed
    let mut s = Steps::default();
    s.note("3x^4>12x^3");
    let p = Problem::new(Kind::Derivative, "d/dx (3x^4)".into(), s, Some("12x^3".into()));
    assert_eq!(p.worked, "3x^4>12x^3|12x^3");
    assert_eq!(p.answer, "12x^3");
    let mut rng = Rng::new(3);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3000 {
        let p = generate(&mut rng, Kind::Quadratic);
        if p.answer.split(" or ").count() == 1 {
            seen.insert("double");
        }
        let p = generate(&mut rng, Kind::Product);
        if p.question.contains("cos") {
            assert!(p.answer.contains(" - "), "{} → {}", p.question, p.answer);
        }
        let p = generate(&mut rng, Kind::Div);
        seen.insert(if p.answer.contains("remainder") { "remainder" } else { "exact" });
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn a_mix_of_some_kinds_draws_only_those_at_the_default_proportions() {
    let names: Vec<String> = ["sub", "expr", "sub"].iter().map(|s| s.to_string()).collect();
    let mix = Mix::only(&names).unwrap();
    let mut rng = Rng::new(3);
    let n = 20_000;
    let subs = (0..n).filter(|_| match mix.sample(&mut rng) {
        Kind::Sub => true,
        Kind::Expr => false,
        k => panic!("drew {k:?}, not one of the named kinds"),
    });
    // Default weights sub 0.10, expr 0.16: sub's share 0.10 / 0.26 ≈ 0.385 (σ ≈ 0.0034).
    let share = subs.count() as f64 / n as f64;
    assert!((share - 0.10 / 0.26).abs() < 0.015, "sub share {share}");
    let err = Mix::only(&["add".to_string(), "love".to_string()]).unwrap_err();
    assert!(err.contains("`love`") && err.contains("expr"), "{err}");
    assert!(Mix::only(&[]).is_err());
    // Weights given: sub three times as often as expr; the kinds in the default order
    // however they are listed.
    let weighted = Mix::only(&["expr=1".to_string(), "sub = 3".to_string()]).unwrap();
    assert_eq!(weighted.0, vec![(Kind::Sub, 3.0), (Kind::Expr, 1.0)]);
    let subs = (0..n).filter(|_| weighted.sample(&mut rng) == Kind::Sub).count();
    assert!((subs as f64 / n as f64 - 0.75).abs() < 0.015, "sub share {subs}");
    for bad in ["sub=0", "sub=-1", "sub=lots", "sub=inf"] {
        let err = Mix::only(&[bad.to_string()]).unwrap_err();
        assert!(err.contains("weight") && err.contains("sub"), "{bad}: {err}");
    }
}
