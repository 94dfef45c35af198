//! Mathematical notation as people write it, parsed into a tree that can be evaluated.
//!
//! Used to *grade* answers (two answers are the same when they agree as functions) and to
//! recognise which kind of question was asked — never to compute an answer for the model.
//!
//! Grammar (spaces ignored; juxtaposition multiplies, so `2x sin(x)` is `2·x·sin(x)`):
//! ```text
//! sum     := product (('+' | '-') product)*
//! product := unary (('*' | '/' | <juxtaposition>) unary)*
//! unary   := '-' unary | power
//! power   := atom ('^' unary)?            right-associative
//! atom    := number | x | y | C | e | (sin | cos | exp) '(' sum ')' | '(' sum ')'
//! ```

/// A parsed expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// an integer literal
    Num(i64),
    /// `x`, `y` or the constant of integration `C`
    Var(char),
    /// Euler's number
    E,
    /// `-a`
    Neg(Box<Node>),
    /// `a + b`, `a - b`, `a * b`, `a / b`, `a ^ b`
    Bin(Box<Node>, char, Box<Node>),
    /// `sin(a)`, `cos(a)`, `exp(a)`
    Func(&'static str, Box<Node>),
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(i64),
    Var(char),
    E,
    Func(&'static str),
    Op(char),
    Open,
    Close,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = vec![];
    let mut i = 0;
    while i < c.len() {
        let rest: String = c[i..].iter().take(3).collect();
        if c[i].is_ascii_digit() {
            let start = i;
            while i < c.len() && c[i].is_ascii_digit() {
                i += 1;
            }
            let text: String = c[start..i].iter().collect();
            out.push(Tok::Num(text.parse().map_err(|_| format!("the number {text} is too large"))?));
            continue;
        }
        if let Some(f) = ["sin", "cos", "exp"].into_iter().find(|f| rest == *f) {
            out.push(Tok::Func(f));
            i += 3;
            continue;
        }
        out.push(match c[i] {
            'x' | 'y' | 'C' => Tok::Var(c[i]),
            'e' => Tok::E,
            '+' | '-' | '*' | '/' | '^' => Tok::Op(c[i]),
            '(' => Tok::Open,
            ')' => Tok::Close,
            other => return Err(format!("`{other}` is not part of the notation")),
        });
        i += 1;
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }
    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.at += 1;
            true
        } else {
            false
        }
    }
    fn sum(&mut self) -> Result<Node, String> {
        let mut v = self.product()?;
        while let Some(Tok::Op(op @ ('+' | '-'))) = self.peek().cloned() {
            self.at += 1;
            v = Node::Bin(Box::new(v), op, Box::new(self.product()?));
        }
        Ok(v)
    }
    fn product(&mut self) -> Result<Node, String> {
        let mut v = self.unary()?;
        loop {
            match self.peek() {
                Some(Tok::Op(op @ ('*' | '/'))) => {
                    let op = *op;
                    self.at += 1;
                    v = Node::Bin(Box::new(v), op, Box::new(self.unary()?));
                }
                Some(Tok::Num(_) | Tok::Var(_) | Tok::E | Tok::Func(_) | Tok::Open) => {
                    v = Node::Bin(Box::new(v), '*', Box::new(self.power()?));
                }
                _ => return Ok(v),
            }
        }
    }
    fn unary(&mut self) -> Result<Node, String> {
        if self.eat(&Tok::Op('-')) {
            return Ok(Node::Neg(Box::new(self.unary()?)));
        }
        self.power()
    }
    fn power(&mut self) -> Result<Node, String> {
        let base = self.atom()?;
        if self.eat(&Tok::Op('^')) {
            return Ok(Node::Bin(Box::new(base), '^', Box::new(self.unary()?)));
        }
        Ok(base)
    }
    fn atom(&mut self) -> Result<Node, String> {
        let t = self.peek().cloned().ok_or("the expression ends too early")?;
        self.at += 1;
        match t {
            Tok::Num(n) => Ok(Node::Num(n)),
            Tok::Var(v) => Ok(Node::Var(v)),
            Tok::E => Ok(Node::E),
            Tok::Func(f) => {
                if !self.eat(&Tok::Open) {
                    return Err(format!("`{f}` needs its argument in parentheses"));
                }
                let a = self.sum()?;
                if !self.eat(&Tok::Close) {
                    return Err("a parenthesis is not closed".into());
                }
                Ok(Node::Func(f, Box::new(a)))
            }
            Tok::Open => {
                let a = self.sum()?;
                if !self.eat(&Tok::Close) {
                    return Err("a parenthesis is not closed".into());
                }
                Ok(a)
            }
            Tok::Close => Err("a `)` without its `(`".into()),
            Tok::Op(o) => Err(format!("`{o}` where a number or a variable should be")),
        }
    }
}

/// Parses an expression (the whole text).
pub fn parse(s: &str) -> Result<Node, String> {
    let mut p = Parser { toks: lex(s)?, at: 0 };
    let n = p.sum()?;
    if p.at != p.toks.len() {
        return Err("unexpected text after the expression".into());
    }
    Ok(n)
}

impl Node {
    /// The value at `x`, `y` and `C` (`C` is the constant of integration).
    pub fn eval(&self, x: f64, y: f64, c: f64) -> f64 {
        match self {
            Node::Num(n) => *n as f64,
            Node::Var('x') => x,
            Node::Var('y') => y,
            Node::Var(_) => c,
            Node::E => std::f64::consts::E,
            Node::Neg(a) => -a.eval(x, y, c),
            Node::Bin(a, op, b) => {
                let (a, b) = (a.eval(x, y, c), b.eval(x, y, c));
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    '/' => a / b,
                    _ => a.powf(b),
                }
            }
            Node::Func(f, a) => {
                let a = a.eval(x, y, c);
                match *f {
                    "sin" => a.sin(),
                    "cos" => a.cos(),
                    _ => a.exp(),
                }
            }
        }
    }

    /// Whether the tree mentions variable `v`.
    pub fn has_var(&self, v: char) -> bool {
        match self {
            Node::Var(w) => *w == v,
            Node::Num(_) | Node::E => false,
            Node::Neg(a) | Node::Func(_, a) => a.has_var(v),
            Node::Bin(a, _, b) => a.has_var(v) || b.has_var(v),
        }
    }

    /// The tree as a polynomial in `x` with integer coefficients, `coefs[k]` for `x^k`,
    /// when it is one: sums, differences, integer multiples and products of
    /// polynomials, and powers of them with a literal exponent (`None` for anything
    /// else: division, functions, `e`, other variables).
    pub fn polynomial(&self) -> Option<Vec<i64>> {
        fn add(a: &[i64], b: &[i64], sign: i64) -> Vec<i64> {
            let mut r = vec![0i64; a.len().max(b.len())];
            for (i, v) in a.iter().enumerate() {
                r[i] = r[i].wrapping_add(*v);
            }
            for (i, v) in b.iter().enumerate() {
                r[i] = r[i].wrapping_add(sign.wrapping_mul(*v));
            }
            r
        }
        fn mul(a: &[i64], b: &[i64]) -> Option<Vec<i64>> {
            let mut r = vec![0i64; a.len() + b.len() - 1];
            for (i, x) in a.iter().enumerate() {
                for (j, y) in b.iter().enumerate() {
                    r[i + j] = r[i + j].checked_add(x.checked_mul(*y)?)?;
                }
            }
            Some(r)
        }
        match self {
            Node::Num(n) => Some(vec![*n]),
            Node::Var('x') => Some(vec![0, 1]),
            Node::Neg(a) => Some(a.polynomial()?.iter().map(|v| v.wrapping_neg()).collect()),
            Node::Bin(a, op @ ('+' | '-'), b) => Some(add(&a.polynomial()?, &b.polynomial()?, if *op == '+' { 1 } else { -1 })),
            Node::Bin(a, '*', b) => mul(&a.polynomial()?, &b.polynomial()?),
            Node::Bin(a, '^', b) => {
                let Node::Num(k) = **b else { return None };
                if !(0..=12).contains(&k) {
                    return None;
                }
                let base = a.polynomial()?;
                (0..k).try_fold(vec![1], |acc, _| mul(&acc, &base))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str, x: f64) -> f64 {
        parse(s).unwrap().eval(x, 0.0, 0.0)
    }

    #[test]
    fn precedence_juxtaposition_and_functions() {
        assert_eq!(at("2+3*4", 0.0), 14.0);
        assert_eq!(at("(16 + 29) * (14 - 8)", 0.0), 270.0);
        assert_eq!(at("-x^2", 3.0), -9.0);
        assert_eq!(at("2x^3 + 2x^2", 2.0), 24.0);
        assert!((at("2x sin(x) + x^2 cos(x)", 0.5) - (1.0 * 0.5f64.sin() + 0.25 * 0.5f64.cos())).abs() < 1e-12);
        assert!((at("-3sin(3x + 1)", 0.2) + 3.0 * 1.6f64.sin()).abs() < 1e-12);
        assert!((at("e^(2x - 1)", 1.0) - 1f64.exp()).abs() < 1e-12);
        assert!(parse("2 +").is_err());
        assert!(parse("what").is_err());
        assert!(parse("sin x").is_err());
    }

    #[test]
    fn polynomials_are_recognised() {
        assert_eq!(parse("3x^4 - 2x^2 + 7x - 5").unwrap().polynomial(), Some(vec![-5, 7, -2, 0, 3]));
        assert_eq!(parse("(x - 2)(x + 3)").unwrap().polynomial(), Some(vec![-6, 1, 1]));
        assert_eq!(parse("sin(x)^2").unwrap().polynomial(), None);
        assert_eq!(parse("1/x").unwrap().polynomial(), None);
    }
}
