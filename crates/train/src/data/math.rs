//! Math problems with worked answers.
//!
//! Problem kinds: integer arithmetic with `+ - *` and parentheses (operands up to 3
//! digits, results may be negative), linear equations in one unknown with integer
//! solutions, and short word problems. Every problem comes with a worked answer: the
//! binary operations that compute it, one step each, separated by `;`, the last step's
//! result being the answer (`58*73` → `58*3=174;58*70=4060;174+4060=4234`).
//!
//! The model reads and writes the worked answer with every digit run reversed
//! (least-significant digit first, see [`to_model_digits`]): then each output digit of an
//! addition or a partial product depends only on digits already seen and one carry,
//! which a small model learns quickly. The reversal is a fixed, invertible encoding of
//! the answer text, undone before anything is shown.

use ultramoe_model::init::Rng;

/// What kind of problem, for sampling mixes and per-kind accuracy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// one `+` or `-` between 2–3 digit numbers
    AddSub,
    /// one `+` or `-` with a 1-digit operand (`12 + 7`)
    AddSubShort,
    /// 2-digit × 2-digit
    Mul2x2,
    /// other products (1–3 digits by 1–2 digits)
    Mul,
    /// several operations, maybe parentheses
    Expr,
    /// `ax + b = c`
    Equation,
    /// a sentence around one operation
    Word,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 7] = [Kind::AddSub, Kind::AddSubShort, Kind::Mul2x2, Kind::Mul, Kind::Expr, Kind::Equation, Kind::Word];
    /// Short name used on the command line and in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::AddSub => "addsub",
            Kind::AddSubShort => "addsub1",
            Kind::Mul2x2 => "mul2x2",
            Kind::Mul => "mul",
            Kind::Expr => "expr",
            Kind::Equation => "equation",
            Kind::Word => "word",
        }
    }
    /// Parses [`Kind::name`].
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == s)
    }
}

/// A problem as a person types it, its worked answer (normal digit order) and the final
/// answer.
#[derive(Clone, Debug)]
pub struct Problem {
    /// kind
    pub kind: Kind,
    /// question text
    pub question: String,
    /// worked answer, steps separated by `;`
    pub worked: String,
    /// final answer
    pub answer: String,
}

/// Reverses every maximal run of digits: `58*70=4060` ↔ `85*07=0604`. Its own inverse.
pub fn to_model_digits(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else {
            out.extend(run.chars().rev());
            run.clear();
            out.push(c);
        }
    }
    out.extend(run.chars().rev());
    out
}

/// The final answer of a worked answer: the text after the last `=` of the last step.
pub fn final_answer(worked: &str) -> String {
    let last = worked.rsplit(';').next().unwrap_or("");
    last.rsplit('=').next().unwrap_or("").trim().to_string()
}

/// A worked-answer builder: records binary steps and returns their values.
#[derive(Default)]
struct Steps(Vec<String>);

impl Steps {
    /// `a + b`.
    fn add(&mut self, a: i64, b: i64) -> i64 {
        self.combine(a, b)
    }
    /// `a - b`.
    fn sub(&mut self, a: i64, b: i64) -> i64 {
        self.combine(a, -b)
    }
    /// `a + b` for signed `a`, `b`, written with additions and subtractions of
    /// magnitudes only, larger minus smaller; a negative result gets its own step
    /// `=-r`. So `75-431` becomes `431-75=356;=-356` and `-31-9` becomes
    /// `31+9=40;=-40`: every digit computation has non-negative operands and result.
    fn combine(&mut self, a: i64, b: i64) -> i64 {
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
    /// `a * b`: one step when `|b| < 10`, else one partial product per digit of `b`
    /// (`a·d_i·10^i`) and a running sum.
    fn mul(&mut self, a: i64, b: i64) -> i64 {
        if b.abs() < 10 {
            let r = a * b;
            self.0.push(format!("{a}*{b}={r}"));
            return r;
        }
        let sign = b.signum();
        let mut rest = b.abs();
        let mut place = 1;
        let mut total: Option<i64> = None;
        while rest > 0 {
            let d = rest % 10 * place * sign;
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
    /// `a / b`, exact.
    fn div(&mut self, a: i64, b: i64) -> i64 {
        let r = a / b;
        self.0.push(format!("{a}/{b}={r}"));
        r
    }
    fn finish(self, kind: Kind, question: String) -> Problem {
        let worked = self.0.join(";");
        let answer = final_answer(&worked);
        Problem { kind, question, worked, answer }
    }
}

/// An arithmetic expression tree.
#[derive(Clone, Debug)]
enum Expr {
    Num(i64),
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
    /// Text with the parentheses that precedence requires.
    fn text(&self, spaced: bool) -> String {
        match self {
            Expr::Num(n) => n.to_string(),
            Expr::Bin(l, op, r) => {
                let wrap = |e: &Expr, right: bool| {
                    let need = match e {
                        Expr::Bin(_, o, _) => Expr::prec(*o) < Expr::prec(*op) || (right && Expr::prec(*o) == Expr::prec(*op) && *op != '*'),
                        _ => false,
                    };
                    if need {
                        format!("({})", e.text(spaced))
                    } else {
                        e.text(spaced)
                    }
                };
                let sep = if spaced { " " } else { "" };
                format!("{}{sep}{op}{sep}{}", wrap(l, false), wrap(r, true))
            }
        }
    }
    /// Evaluates left to right, recording each operation as a step.
    fn eval(&self, s: &mut Steps) -> i64 {
        match self {
            Expr::Num(n) => *n,
            Expr::Bin(l, op, r) => {
                let a = l.eval(s);
                let b = r.eval(s);
                match op {
                    '+' => s.add(a, b),
                    '-' => s.sub(a, b),
                    _ => s.mul(a, b),
                }
            }
        }
    }
}

/// A number with exactly `digits` digits (1 ⇒ 0..=9).
fn num_digits(rng: &mut Rng, digits: u32) -> i64 {
    if digits == 1 {
        rng.range(0, 9)
    } else {
        rng.range(10i64.pow(digits - 1), 10i64.pow(digits) - 1)
    }
}

fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.range(0, xs.len() as i64 - 1) as usize]
}

/// How a person might type `a op b`.
fn typed_binary(rng: &mut Rng, a: i64, op: char, b: i64) -> String {
    let sym = match op {
        '*' => pick(rng, &["*", "*", "x", "×"]).to_string(),
        o => o.to_string(),
    };
    let core = if rng.range(0, 3) == 0 { format!("{a}{sym}{b}") } else { format!("{a} {sym} {b}") };
    match rng.range(0, 5) {
        0 => format!("What is {core}?"),
        1 => format!("{core} ="),
        _ => core,
    }
}

/// `a + b` or `a - b`, even odds, typed as a person would.
fn add_or_sub(rng: &mut Rng, mut s: Steps, kind: Kind, a: i64, b: i64) -> Problem {
    let op = if rng.range(0, 1) == 0 { '+' } else { '-' };
    let q = typed_binary(rng, a, op, b);
    if op == '+' {
        s.add(a, b);
    } else {
        s.sub(a, b);
    }
    s.finish(kind, q)
}

/// Which side of the train/test split a problem is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// problems training may see
    Train,
    /// held out: evaluation only
    Test,
}

/// Every problem belongs to exactly one split, decided by a hash of its normalised
/// text (one in ten is held out), so "unseen" is literal: training never draws a test
/// problem in any surface form that normalises the same way.
pub fn split_of(question: &str) -> Split {
    let norm = crate::data::tokenizer::normalize_question(question);
    // FNV-1a
    let h = norm.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    if h % 10 == 0 {
        Split::Test
    } else {
        Split::Train
    }
}

/// Samples one problem of `kind` from `split`.
pub fn generate_in(rng: &mut Rng, kind: Kind, split: Split) -> Problem {
    loop {
        let p = generate(rng, kind);
        if split_of(&p.question) == split {
            return p;
        }
    }
}

/// Samples one problem of `kind`, from either split.
pub fn generate(rng: &mut Rng, kind: Kind) -> Problem {
    let mut s = Steps::default();
    match kind {
        Kind::AddSub => {
            let (da, db) = (rng.range(2, 3) as u32, rng.range(2, 3) as u32);
            let (a, b) = (num_digits(rng, da), num_digits(rng, db));
            add_or_sub(rng, s, kind, a, b)
        }
        Kind::AddSubShort => {
            let long = rng.range(1, 3) as u32;
            let (mut a, mut b) = (num_digits(rng, long), num_digits(rng, 1));
            if rng.range(0, 1) == 0 {
                std::mem::swap(&mut a, &mut b);
            }
            add_or_sub(rng, s, kind, a, b)
        }
        Kind::Mul2x2 | Kind::Mul => {
            let (da, db) = if kind == Kind::Mul2x2 { (2, 2) } else { (rng.range(1, 3) as u32, rng.range(1, 2) as u32) };
            let (a, b) = (num_digits(rng, da), num_digits(rng, db));
            let q = typed_binary(rng, a, '*', b);
            s.mul(a, b);
            s.finish(kind, q)
        }
        Kind::Expr => {
            let n_ops = rng.range(2, 3);
            let first = rng.range(1, 2) as u32;
            let mut e = Expr::Num(num_digits(rng, first));
            for _ in 0..n_ops {
                let op = ['+', '-', '*'][rng.range(0, 2) as usize];
                let digits = if op == '*' { 1 } else { rng.range(1, 2) as u32 };
                let leaf = Expr::Num(num_digits(rng, digits));
                e = if rng.range(0, 1) == 0 { Expr::Bin(Box::new(e), op, Box::new(leaf)) } else { Expr::Bin(Box::new(leaf), op, Box::new(e)) };
            }
            let q = e.text(rng.range(0, 1) == 0);
            e.eval(&mut s);
            s.finish(kind, q)
        }
        Kind::Equation => {
            let a = loop {
                let a = rng.range(-12, 12);
                if a != 0 {
                    break a;
                }
            };
            let x = rng.range(-20, 20);
            let b = loop {
                let b = rng.range(-99, 99);
                if b != 0 {
                    break b;
                }
            };
            let c = a * x + b;
            let ax = match a {
                1 => "x".to_string(),
                -1 => "-x".to_string(),
                a => format!("{a}x"),
            };
            let lhs = if rng.range(0, 3) == 0 {
                // constant first: b + ax, b - |a|x
                let ax_abs = match a.abs() {
                    1 => "x".to_string(),
                    m => format!("{m}x"),
                };
                format!("{b} {} {ax_abs}", if a > 0 { '+' } else { '-' })
            } else {
                format!("{ax} {} {}", if b > 0 { '+' } else { '-' }, b.abs())
            };
            let q = match rng.range(0, 2) {
                0 => format!("Solve for x: {lhs} = {c}"),
                1 => format!("{lhs} = {c}"),
                _ => format!("Solve {lhs} = {c}"),
            };
            let r = s.sub(c, b);
            s.div(r, a);
            s.finish(kind, q)
        }
        Kind::Word => {
            let names = ["Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Eva", "Ben"];
            let items = ["apples", "books", "coins", "stamps", "cards", "pens", "shells", "marbles"];
            let name = pick(rng, &names);
            let item = pick(rng, &items);
            match rng.range(0, 3) {
                0 => {
                    let (a, b) = (rng.range(10, 499), rng.range(10, 499));
                    s.add(a, b);
                    s.finish(kind, format!("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"))
                }
                1 => {
                    let a = rng.range(20, 999);
                    let b = rng.range(1, a);
                    s.sub(a, b);
                    s.finish(kind, format!("{name} had {a} {item} and gave away {b}. How many {item} are left?"))
                }
                2 => {
                    let (a, b) = (rng.range(2, 12), rng.range(2, 99));
                    s.mul(b, a);
                    s.finish(kind, format!("A box holds {b} {item}. How many {item} are in {a} boxes?"))
                }
                _ => {
                    let (a, b) = (rng.range(2, 9), rng.range(2, 99));
                    s.mul(b, a);
                    s.finish(kind, format!("{name} buys {a} bags with {b} {item} in each. How many {item} is that?"))
                }
            }
        }
    }
}

/// A weighted mix of kinds to sample from.
#[derive(Clone, Debug)]
pub struct Mix(pub Vec<(Kind, f64)>);

impl Default for Mix {
    /// The training mix: most weight on the skills the demo is judged on.
    fn default() -> Self {
        Mix(vec![
            (Kind::AddSub, 0.26),
            (Kind::AddSubShort, 0.05),
            (Kind::Mul2x2, 0.16),
            (Kind::Mul, 0.08),
            (Kind::Equation, 0.23),
            (Kind::Expr, 0.10),
            (Kind::Word, 0.12),
        ])
    }
}

impl Mix {
    /// Samples a kind.
    pub fn sample(&self, rng: &mut Rng) -> Kind {
        let total: f64 = self.0.iter().map(|(_, w)| w).sum();
        let mut u = rng.uniform() * total;
        for (k, w) in &self.0 {
            if u < *w {
                return *k;
            }
            u -= w;
        }
        self.0.last().expect("mix is not empty").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval_worked(worked: &str) {
        let mut prev: Option<i64> = None;
        for step in worked.split(';') {
            let (lhs, rhs) = step.split_once('=').unwrap();
            let r: i64 = rhs.parse().unwrap();
            if lhs.is_empty() {
                // a sign step restates the previous magnitude
                assert_eq!(Some(r.abs()), prev.map(i64::abs), "sign step {step} in {worked}");
                prev = Some(r);
                continue;
            }
            prev = Some(r);
            // find the operator after an optional leading sign
            let body = &lhs[1..];
            let pos = body.find(['+', '-', '*', '/']).unwrap() + 1;
            let a: i64 = lhs[..pos].parse().unwrap();
            let b: i64 = lhs[pos + 1..].parse().unwrap();
            let v = match &lhs[pos..pos + 1] {
                "+" => a + b,
                "-" => a - b,
                "*" => a * b,
                _ => a / b,
            };
            assert_eq!(v, r, "step {step} in {worked}");
        }
    }

    #[test]
    fn worked_answers_are_correct_and_end_in_the_answer() {
        let mut rng = Rng::new(1);
        for kind in Kind::ALL {
            for _ in 0..500 {
                let p = generate(&mut rng, kind);
                eval_worked(&p.worked);
                assert_eq!(final_answer(&p.worked), p.answer);
            }
        }
        let mut s = Steps::default();
        assert_eq!(s.mul(58, 73), 4234);
        assert_eq!(s.0.join(";"), "58*3=174;58*70=4060;174+4060=4234");
        let mut s = Steps::default();
        assert_eq!(s.sub(75, 431), -356);
        assert_eq!(s.sub(-31, 9), -40);
        assert_eq!(s.add(-31, 40), 9);
        assert_eq!(s.0.join(";"), "431-75=356;=-356;31+9=40;=-40;40-31=9");
    }

    /// Independent evaluator (recursive descent: + - * / with unary minus and
    /// parentheses) used to check generated answers against the question text.
    fn eval_text(e: &str) -> i64 {
        fn expr(c: &[char], i: &mut usize) -> i64 {
            let mut v = term(c, i);
            while *i < c.len() && (c[*i] == '+' || c[*i] == '-') {
                let op = c[*i];
                *i += 1;
                let r = term(c, i);
                v = if op == '+' { v + r } else { v - r };
            }
            v
        }
        fn term(c: &[char], i: &mut usize) -> i64 {
            let mut v = factor(c, i);
            while *i < c.len() && (c[*i] == '*' || c[*i] == '/') {
                let op = c[*i];
                *i += 1;
                let r = factor(c, i);
                v = if op == '*' { v * r } else { v / r };
            }
            v
        }
        fn factor(c: &[char], i: &mut usize) -> i64 {
            if c[*i] == '-' {
                *i += 1;
                return -factor(c, i);
            }
            if c[*i] == '(' {
                *i += 1;
                let v = expr(c, i);
                *i += 1;
                return v;
            }
            let start = *i;
            while *i < c.len() && c[*i].is_ascii_digit() {
                *i += 1;
            }
            c[start..*i].iter().collect::<String>().parse().unwrap()
        }
        let c: Vec<char> = e.chars().filter(|c| !c.is_whitespace()).collect();
        let mut i = 0;
        let v = expr(&c, &mut i);
        assert_eq!(i, c.len(), "unparsed text in {e}");
        v
    }

    #[test]
    fn answers_agree_with_an_independent_evaluator() {
        let mut rng = Rng::new(2);
        for _ in 0..300 {
            let p = generate(&mut rng, Kind::Equation);
            let x: i64 = p.answer.parse().unwrap();
            let q = crate::data::tokenizer::normalize_question(&p.question);
            let (lhs, rhs) = q.split_once('=').unwrap();
            // 4x → 4*(x), a bare x → (x)
            let mut sub = String::new();
            for ch in lhs.chars() {
                if ch == 'x' {
                    if sub.ends_with(|c: char| c.is_ascii_digit()) {
                        sub.push('*');
                    }
                    sub.push_str(&format!("({x})"));
                } else {
                    sub.push(ch);
                }
            }
            assert_eq!(eval_text(&sub), eval_text(rhs), "{} with x = {x}", p.question);
        }
        for kind in [Kind::AddSub, Kind::AddSubShort, Kind::Mul2x2, Kind::Mul, Kind::Expr] {
            for _ in 0..300 {
                let p = generate(&mut rng, kind);
                let q = crate::data::tokenizer::normalize_question(&p.question);
                assert_eq!(eval_text(&q).to_string(), p.answer, "{}", p.question);
            }
        }
    }

    #[test]
    fn splits_are_disjoint_and_held_out_is_a_tenth() {
        let mut rng = Rng::new(5);
        let test: Vec<Problem> = (0..200).map(|_| generate_in(&mut rng, Kind::Mul2x2, Split::Test)).collect();
        assert!(test.iter().all(|p| split_of(&p.question) == Split::Test));
        assert_eq!(split_of("58 x 73"), split_of("58*73"), "surface forms share a split");
        let n_test = (0..2000).filter(|_| split_of(&generate(&mut rng, Kind::AddSub).question) == Split::Test).count();
        assert!((120..280).contains(&n_test), "{n_test} of 2000 held out");
    }

    #[test]
    fn digit_reversal_is_an_involution() {
        let s = "31+9=40;=-40;-40/-4=10";
        assert_eq!(to_model_digits(s), "13+9=04;=-04;-04/-4=01");
        assert_eq!(to_model_digits(&to_model_digits(s)), s);
    }
}
