//! Arithmetic problems: sums, differences, products, divisions, expressions and word
//! problems, typed the ways people type them.

use super::steps::{digits, Steps};
use super::{pick, Kind, Problem};
use ultramoe_model::init::Rng;

/// An arithmetic expression tree.
#[derive(Clone, Debug)]
pub enum Expr {
    /// a number (negative only as an intermediate result)
    Num(i64),
    /// `a op b` with op one of `+ - *`
    Bin(Box<Expr>, char, Box<Expr>),
}

impl Expr {
    fn prec(op: char) -> u8 {
        if op == '*' {
            2
        } else {
            1
        }
    }

    /// Text with the parentheses that make it read as the tree is built (precedence,
    /// and left to right among equals: a right operand of the same precedence keeps its
    /// parentheses, `2*(7*24)`); a negative number that does not open the text is
    /// parenthesised (`3*(-5)`).
    pub fn text(&self, spaced: bool) -> String {
        self.text_at(spaced, true)
    }

    fn text_at(&self, spaced: bool, first: bool) -> String {
        match self {
            Expr::Num(n) if *n < 0 && !first => format!("({n})"),
            Expr::Num(n) => n.to_string(),
            Expr::Bin(l, op, r) => {
                let side = |e: &Expr, right: bool, first: bool| {
                    let need = match e {
                        Expr::Bin(_, o, _) => Expr::prec(*o) < Expr::prec(*op) || (right && Expr::prec(*o) == Expr::prec(*op)),
                        _ => false,
                    };
                    if need {
                        format!("({})", e.text_at(spaced, true))
                    } else {
                        e.text_at(spaced, first)
                    }
                };
                let sep = if spaced { " " } else { "" };
                format!("{}{sep}{op}{sep}{}", side(l, false, first), side(r, true, false))
            }
        }
    }

    /// Number of operations.
    pub fn ops(&self) -> usize {
        match self {
            Expr::Num(_) => 0,
            Expr::Bin(l, _, r) => 1 + l.ops() + r.ops(),
        }
    }

    /// The first operation in evaluation order (left operand's operations, then the
    /// right's, then its own) whose operands are both numbers, replaced by its value.
    /// Returns whether one was found.
    fn reduce_first(&mut self, s: &mut Steps) -> bool {
        let Expr::Bin(l, op, r) = self else { return false };
        if l.reduce_first(s) || r.reduce_first(s) {
            return true;
        }
        let (Expr::Num(a), Expr::Num(b)) = (&**l, &**r) else { unreachable!("both sides reduced") };
        let v = match op {
            '+' => s.add(*a, *b),
            '-' => s.sub(*a, *b),
            _ => s.mul_short(*a, *b),
        };
        *self = Expr::Num(v);
        true
    }

    /// Evaluates one operation at a time in the usual order (parentheses first, then
    /// `*` before `+ -`, left to right), writing after each operation the expression
    /// that remains (`(16+29)*(14-8)`: `16+29=45;45*(14-8);14-8=6;45*6;45*6=270`), so
    /// the next operation is always in plain sight.
    pub fn eval_rewriting(mut self, s: &mut Steps) -> i64 {
        loop {
            self.reduce_first(s);
            match &self {
                Expr::Num(v) => return *v,
                e => s.note(e.text(false)),
            }
        }
    }

    /// Evaluates without steps.
    pub fn value(&self) -> i64 {
        match self {
            Expr::Num(n) => *n,
            Expr::Bin(l, op, r) => {
                let (a, b) = (l.value(), r.value());
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    _ => a * b,
                }
            }
        }
    }
}

/// A number with exactly `digits` digits (1 ⇒ 0..=9).
pub fn num_digits(rng: &mut Rng, digits: u32) -> i64 {
    if digits == 1 {
        rng.range(0, 9)
    } else {
        rng.range(10i64.pow(digits - 1), 10i64.pow(digits) - 1)
    }
}

/// How a person might type `a op b` (`op` one of `+ - * /`): symbols or words, with or
/// without spaces, "What is …?", "Calculate …", a trailing `=`.
pub fn typed_binary(rng: &mut Rng, a: i64, op: char, b: i64) -> String {
    let b_text = if b < 0 && rng.range(0, 1) == 0 { format!("({b})") } else { b.to_string() };
    let worded = rng.range(0, 3) == 0;
    let sym = if worded {
        match op {
            '+' => "plus",
            '-' => "minus",
            '*' => pick(rng, &["times", "multiplied by"]),
            _ => "divided by",
        }
        .to_string()
    } else {
        match op {
            '*' => pick(rng, &["*", "*", "x", "×"]).to_string(),
            '/' => pick(rng, &["/", "/", "÷"]).to_string(),
            o => o.to_string(),
        }
    };
    let core = if !worded && rng.range(0, 3) == 0 { format!("{a}{sym}{b_text}") } else { format!("{a} {sym} {b_text}") };
    match rng.range(0, 6) {
        0 | 1 => format!("What is {core}?"),
        2 => format!("{core} ="),
        3 if worded => format!("Calculate {core}"),
        _ => core,
    }
}

/// An operand for sums and differences: 1–3 digits, negative one time in eight.
fn signed_operand(rng: &mut Rng) -> i64 {
    let d = [1, 2, 2, 3, 3, 3][rng.range(0, 5) as usize];
    let v = num_digits(rng, d);
    if rng.range(0, 7) == 0 {
        -v
    } else {
        v
    }
}

/// `a + b` or `a - b`.
pub fn add_sub(rng: &mut Rng, kind: Kind) -> Problem {
    let (a, b) = (signed_operand(rng), signed_operand(rng));
    let op = if kind == Kind::Add { '+' } else { '-' };
    let q = typed_binary(rng, a, op, b);
    let mut s = Steps::default();
    if op == '+' {
        s.add(a, b);
    } else {
        s.sub(a, b);
    }
    Problem::new(kind, q, s, None)
}

/// A product of 1–3 digit numbers, one of them negative one time in ten.
pub fn mul(rng: &mut Rng) -> Problem {
    let (da, db) = ([1, 2, 2, 3, 3][rng.range(0, 4) as usize], [1, 2, 2, 3][rng.range(0, 3) as usize]);
    let (mut a, mut b) = (num_digits(rng, da), num_digits(rng, db));
    match rng.range(0, 19) {
        0 => a = -a,
        1 => b = -b,
        _ => {}
    }
    let q = typed_binary(rng, a, '*', b);
    let mut s = Steps::default();
    s.mul(a, b);
    Problem::new(Kind::Mul, q, s, None)
}

/// Integer division by 2–12: exact half the time (`847 / 7` → `121`), else with a
/// remainder (`100 / 7` → `14 remainder 2`).
pub fn div(rng: &mut Rng) -> Problem {
    let b = rng.range(2, 12);
    let a = if rng.range(0, 1) == 0 {
        b * rng.range(1, (9999 / b).min(999))
    } else {
        let top = [99, 999, 9999][rng.range(0, 2) as usize];
        rng.range(b + 1, top)
    };
    let q = typed_binary(rng, a, '/', b);
    let mut s = Steps::default();
    let (quot, r) = s.long_div(a, b);
    let answer = if r == 0 { quot.to_string() } else { format!("{quot} remainder {r}") };
    Problem::new(Kind::Div, q, s, Some(answer))
}

/// 2–4 operations of `+ - *` with the parentheses precedence needs (`(16 + 29) * (14 - 8)`,
/// `7 + 3 * 12 - 5`).
pub fn expr(rng: &mut Rng) -> Problem {
    fn leaf(rng: &mut Rng) -> Expr {
        let d = rng.range(1, 2) as u32;
        Expr::Num(num_digits(rng, d))
    }
    // Random tree shapes: grow by replacing a random leaf with an operation, so both
    // left- and right-nested and balanced forms (`(a+b)*(c-d)`) come up.
    fn grow(e: &mut Expr, rng: &mut Rng) {
        match e {
            Expr::Num(_) => {
                let op = ['+', '-', '*'][rng.range(0, 2) as usize];
                let old = std::mem::replace(e, Expr::Num(0));
                *e = if rng.range(0, 1) == 0 { Expr::Bin(Box::new(old), op, Box::new(leaf(rng))) } else { Expr::Bin(Box::new(leaf(rng)), op, Box::new(old)) };
            }
            Expr::Bin(l, _, r) => {
                let n_l = l.ops() as i64 + 1;
                let n_r = r.ops() as i64 + 1;
                if rng.range(0, n_l + n_r - 1) < n_l {
                    grow(l, rng)
                } else {
                    grow(r, rng)
                }
            }
        }
    }
    loop {
        let n_ops = rng.range(2, 4);
        let mut e = leaf(rng);
        for _ in 0..n_ops {
            grow(&mut e, rng);
        }
        // Keep products small enough for the step format: no intermediate product of
        // two operands both above two digits, and a result of at most 5 digits.
        if !products_small(&e) || digits(e.value()) > 5 {
            continue;
        }
        let q = e.text(rng.range(0, 2) != 0);
        let q = match rng.range(0, 4) {
            0 => format!("What is {q}?"),
            1 => format!("Calculate {q}"),
            2 => format!("{q} ="),
            _ => q,
        };
        let mut s = Steps::default();
        e.eval_rewriting(&mut s);
        return Problem::new(Kind::Expr, q, s, None);
    }
}

fn products_small(e: &Expr) -> bool {
    match e {
        Expr::Num(_) => true,
        Expr::Bin(l, op, r) => {
            products_small(l) && products_small(r) && (*op != '*' || digits(l.value()).min(digits(r.value())) <= 2)
        }
    }
}

/// A sentence around one operation.
pub fn word(rng: &mut Rng) -> Problem {
    let names = ["Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Eva", "Ben"];
    let items = ["apples", "books", "coins", "stamps", "cards", "pens", "shells", "marbles"];
    let name = pick(rng, &names);
    let item = pick(rng, &items);
    let mut s = Steps::default();
    let q = match rng.range(0, 3) {
        0 => {
            let (a, b) = (rng.range(10, 499), rng.range(10, 499));
            s.add(a, b);
            format!("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?")
        }
        1 => {
            let a = rng.range(20, 999);
            let b = rng.range(1, a);
            s.sub(a, b);
            format!("{name} had {a} {item} and gave away {b}. How many {item} are left?")
        }
        2 => {
            let (a, b) = (rng.range(2, 12), rng.range(2, 99));
            s.mul(b, a);
            format!("A box holds {b} {item}. How many {item} are in {a} boxes?")
        }
        _ => {
            let (a, b) = (rng.range(2, 9), rng.range(2, 99));
            s.mul(b, a);
            format!("{name} buys {a} bags with {b} {item} in each. How many {item} is that?")
        }
    };
    Problem::new(Kind::Word, q, s, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_are_rewritten_one_operation_at_a_time() {
        let e = Expr::Bin(
            Box::new(Expr::Bin(Box::new(Expr::Num(16)), '+', Box::new(Expr::Num(29)))),
            '*',
            Box::new(Expr::Bin(Box::new(Expr::Num(14)), '-', Box::new(Expr::Num(8)))),
        );
        assert_eq!(e.text(true), "(16 + 29) * (14 - 8)");
        let mut s = Steps::default();
        assert_eq!(e.eval_rewriting(&mut s), 270);
        assert_eq!(s.0.join(";"), "16+29=45;45*(14-8);14-8=6;45*6;45*6=270");
        // a negative intermediate is parenthesised where it does not open the text
        let e = Expr::Bin(Box::new(Expr::Num(3)), '*', Box::new(Expr::Bin(Box::new(Expr::Num(2)), '-', Box::new(Expr::Num(9)))));
        let mut s = Steps::default();
        assert_eq!(e.eval_rewriting(&mut s), -21);
        assert_eq!(s.0.join(";"), "9-2=7;=-7;3*(-7);3*-7=-21");
    }
}
