//! The LQL subset the emulator understands: text in, a typed [`LqlQuery`] out.
//!
//! Input is the text of one Lytics query
//! (`SELECT <expr> AS <field> [IF <cond>] [SHORTDESC ".."] [LONGDESC ".."] [KIND <kind>]
//! [MERGEOP <op>], … FROM <stream> INTO user BY <id> [OR <id> …] ALIAS <name>`).
//! Output is the parsed query, or an [`LqlError`] naming the problem with its line and column.
//! Parsing is pure: this module never touches emulator state and never evaluates a query
//! (that is `mapping`'s job). [`LqlQuery`]'s `Display` prints canonical LQL that parses back to
//! the same query, so the relay can generate LQL and check it here.

use std::fmt;

/// Kinds the emulator knows how to store and render.
pub const KINDS: &[&str] = &[
    "string",
    "int",
    "number",
    "bool",
    "date",
    "[]string",
    "map[string]intsum",
    "map[string]string",
];

/// Merge operations the emulator applies when a field receives a new value.
pub const MERGE_OPS: &[&str] = &["latest", "oldest", "sum", "count", "max", "min", "merge"];

/// One parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct LqlQuery {
    /// The query's name; registering a query with the same alias replaces it.
    pub alias: String,
    /// The stream whose records the query maps.
    pub from: String,
    /// The identity fields (user field names) that stitch records into profiles.
    pub by: Vec<String>,
    /// The user fields the query produces, in query order.
    pub fields: Vec<LqlField>,
}

/// One `SELECT` item.
#[derive(Debug, Clone, PartialEq)]
pub struct LqlField {
    /// The user field name (`AS name`).
    pub name: String,
    /// How the value is computed from a record.
    pub expr: LqlExpr,
    /// Only records where this holds update the field.
    pub cond: Option<LqlCond>,
    /// The declared kind, lowercased (one of [`KINDS`]).
    pub kind: Option<String>,
    /// The declared merge op, lowercased (one of [`MERGE_OPS`]).
    pub mergeop: Option<String>,
    /// Human-readable short description.
    pub shortdesc: Option<String>,
    /// Human-readable long description.
    pub longdesc: Option<String>,
}

/// Functions usable in a field expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LqlFunc {
    /// Distinct values (`[]string`, merge union).
    Set,
    /// Count per distinct value (`map[string]intsum`).
    ValueCt,
    /// One per record where the argument exists.
    Count,
    /// Numeric sum.
    Sum,
    /// Largest value.
    Max,
    /// Smallest value.
    Min,
    /// A time value as a date.
    ToDate,
    /// Lowercased and trimmed email address.
    Email,
    /// Hour of day (UTC, "0".."23") of a time value, or of the event time without argument.
    HourOfDay,
    /// The record's event time in epoch milliseconds.
    EpochMs,
}

impl LqlFunc {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "set" => Self::Set,
            "valuect" => Self::ValueCt,
            "count" => Self::Count,
            "sum" => Self::Sum,
            "max" => Self::Max,
            "min" => Self::Min,
            "todate" => Self::ToDate,
            "email" => Self::Email,
            "hourofday" => Self::HourOfDay,
            "epochms" => Self::EpochMs,
            _ => return None,
        })
    }

    /// The function's name as written in canonical LQL.
    pub fn name(self) -> &'static str {
        match self {
            Self::Set => "set",
            Self::ValueCt => "valuect",
            Self::Count => "count",
            Self::Sum => "sum",
            Self::Max => "max",
            Self::Min => "min",
            Self::ToDate => "todate",
            Self::Email => "email",
            Self::HourOfDay => "hourofday",
            Self::EpochMs => "epochms",
        }
    }

    /// The accepted argument counts, inclusive.
    fn arity(self) -> (usize, usize) {
        match self {
            Self::EpochMs => (0, 0),
            Self::HourOfDay | Self::Count => (0, 1),
            _ => (1, 1),
        }
    }
}

/// A field expression.
#[derive(Debug, Clone, PartialEq)]
pub enum LqlExpr {
    /// A record field, by its (flattened) name.
    Field(String),
    /// A function applied to sub-expressions.
    Call(LqlFunc, Vec<LqlExpr>),
}

/// A field condition (`IF …`).
#[derive(Debug, Clone, PartialEq)]
pub enum LqlCond {
    /// The expression yields a value.
    Exists(LqlExpr),
    /// The expression yields a value whose text equals the literal.
    Eq(LqlExpr, String),
    /// The negation of `Eq` (so a missing value counts as not equal).
    Ne(LqlExpr, String),
    /// Both hold.
    And(Box<LqlCond>, Box<LqlCond>),
    /// Either holds.
    Or(Box<LqlCond>, Box<LqlCond>),
    /// The inner condition does not hold.
    Not(Box<LqlCond>),
}

/// Why a query text could not be parsed, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at line {line}, column {column}")]
pub struct LqlError {
    /// What is wrong, lowercase.
    pub message: String,
    /// 1-based line of the offending token.
    pub line: usize,
    /// 1-based column (in characters) of the offending token.
    pub column: usize,
}

/// Parses one LQL query.
pub fn parse_lql(text: &str) -> Result<LqlQuery, LqlError> {
    let tokens = lex(text)?;
    let mut parser = Parser { tokens, pos: 0 };
    parser.query()
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A bare word: keyword, identifier, kind or number.
    Word(String),
    /// A backquoted identifier; never a keyword.
    Quoted(String),
    /// A double-quoted string literal.
    Str(String),
    LParen,
    RParen,
    Comma,
    Semicolon,
    Eof,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Word(w) => write!(f, "`{w}`"),
            Tok::Quoted(w) => write!(f, "`{w}`"),
            Tok::Str(s) => write!(f, "string \"{s}\""),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::Comma => f.write_str("`,`"),
            Tok::Semicolon => f.write_str("`;`"),
            Tok::Eof => f.write_str("end of query"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
    column: usize,
}

fn is_word_char(c: char) -> bool {
    // Brackets belong to words so that kinds like `map[string]intsum` lex as one token; dots
    // let flattened record keys (`context.page.url`) be written bare. Dashes are left out so
    // that `--` always starts a comment: such keys need backquotes.
    c.is_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '$' | '@')
}

fn lex(text: &str) -> Result<Vec<Token>, LqlError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let (mut line, mut column) = (1usize, 1usize);
    // Advances over one character while keeping the position current.
    let bump = |c: char, line: &mut usize, column: &mut usize| {
        if c == '\n' {
            *line += 1;
            *column = 1;
        } else {
            *column += 1;
        }
    };
    while let Some(&c) = chars.peek() {
        let (start_line, start_column) = (line, column);
        let err = |message: String| LqlError {
            message,
            line: start_line,
            column: start_column,
        };
        if c.is_whitespace() {
            chars.next();
            bump(c, &mut line, &mut column);
            continue;
        }
        let single = match c {
            '(' => Some(Tok::LParen),
            ')' => Some(Tok::RParen),
            ',' => Some(Tok::Comma),
            ';' => Some(Tok::Semicolon),
            _ => None,
        };
        if let Some(tok) = single {
            chars.next();
            bump(c, &mut line, &mut column);
            tokens.push(Token {
                tok,
                line: start_line,
                column: start_column,
            });
            continue;
        }
        if c == '-' {
            let mut ahead = chars.clone();
            ahead.next();
            if ahead.peek() == Some(&'-') {
                // A `--` comment runs to the end of the line.
                while let Some(&c) = chars.peek() {
                    if c == '\n' {
                        break;
                    }
                    chars.next();
                    bump(c, &mut line, &mut column);
                }
                continue;
            }
        }
        if c == '`' || c == '"' {
            chars.next();
            bump(c, &mut line, &mut column);
            let mut value = String::new();
            let mut closed = false;
            while let Some(d) = chars.next() {
                bump(d, &mut line, &mut column);
                if d == c {
                    closed = true;
                    break;
                }
                if d == '\\' && c == '"' {
                    match chars.next() {
                        Some(e) => {
                            bump(e, &mut line, &mut column);
                            value.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                other => other,
                            });
                        }
                        None => break,
                    }
                    continue;
                }
                value.push(d);
            }
            if !closed {
                let what = if c == '"' { "string" } else { "quoted identifier" };
                return Err(err(format!("unterminated {what}")));
            }
            let tok = if c == '"' {
                Tok::Str(value)
            } else {
                if value.is_empty() {
                    return Err(err("empty quoted identifier".to_string()));
                }
                Tok::Quoted(value)
            };
            tokens.push(Token {
                tok,
                line: start_line,
                column: start_column,
            });
            continue;
        }
        if is_word_char(c) {
            let mut word = String::new();
            while let Some(&d) = chars.peek() {
                if !is_word_char(d) {
                    break;
                }
                chars.next();
                bump(d, &mut line, &mut column);
                word.push(d);
            }
            tokens.push(Token {
                tok: Tok::Word(word),
                line: start_line,
                column: start_column,
            });
            continue;
        }
        return Err(err(format!("unexpected character `{c}`")));
    }
    tokens.push(Token {
        tok: Tok::Eof,
        line,
        column,
    });
    Ok(tokens)
}

/// Words that end or structure a clause and so can never be bare identifiers.
const RESERVED: &[&str] = &[
    "select",
    "as",
    "if",
    "shortdesc",
    "longdesc",
    "kind",
    "mergeop",
    "from",
    "into",
    "by",
    "or",
    "and",
    "not",
    "alias",
];

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        // The lexer always ends with `Eof`, and `next` never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let token = self.peek().clone();
        if token.tok != Tok::Eof {
            self.pos += 1;
        }
        token
    }

    fn error_at(token: &Token, message: String) -> LqlError {
        LqlError {
            message,
            line: token.line,
            column: token.column,
        }
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(&self.peek().tok, Tok::Word(w) if w.eq_ignore_ascii_case(keyword))
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        let found = self.is_keyword(keyword);
        if found {
            self.next();
        }
        found
    }

    fn expect_keyword(&mut self, keyword: &str, context: &str) -> Result<(), LqlError> {
        if self.eat_keyword(keyword) {
            return Ok(());
        }
        let token = self.peek().clone();
        Err(Self::error_at(
            &token,
            format!(
                "expected `{}` {context}, found {}",
                keyword.to_ascii_uppercase(),
                token.tok
            ),
        ))
    }

    fn expect_token(&mut self, tok: Tok, context: &str) -> Result<(), LqlError> {
        let token = self.next();
        if token.tok == tok {
            return Ok(());
        }
        Err(Self::error_at(
            &token,
            format!("expected {tok} {context}, found {}", token.tok),
        ))
    }

    /// An identifier: a backquoted name or a bare word that is not a keyword.
    fn ident(&mut self, what: &str) -> Result<String, LqlError> {
        let token = self.next();
        match token.tok {
            Tok::Quoted(name) => Ok(name),
            Tok::Word(ref w) if !RESERVED.contains(&w.to_ascii_lowercase().as_str()) => Ok(w.clone()),
            ref other => Err(Self::error_at(&token, format!("expected {what}, found {other}"))),
        }
    }

    fn string(&mut self, what: &str) -> Result<String, LqlError> {
        let token = self.next();
        match token.tok {
            Tok::Str(s) => Ok(s),
            ref other => Err(Self::error_at(
                &token,
                format!("expected a double-quoted {what}, found {other}"),
            )),
        }
    }

    fn query(&mut self) -> Result<LqlQuery, LqlError> {
        self.expect_keyword("select", "at the start of the query")?;
        let mut fields: Vec<LqlField> = Vec::new();
        loop {
            let start = self.peek().clone();
            let field = self.field()?;
            if fields.iter().any(|f| f.name == field.name) {
                return Err(Self::error_at(
                    &start,
                    format!("field `{}` is selected twice", field.name),
                ));
            }
            fields.push(field);
            if self.peek().tok == Tok::Comma {
                self.next();
                continue;
            }
            break;
        }
        self.expect_keyword("from", "after the selected fields")?;
        let from = self.ident("a stream name after `FROM`")?;
        self.expect_keyword("into", "after the stream name")?;
        let table_token = self.peek().clone();
        let table = self.ident("a table name after `INTO`")?;
        if !table.eq_ignore_ascii_case("user") {
            return Err(Self::error_at(
                &table_token,
                format!("unsupported table `{table}`: only `INTO user` is supported"),
            ));
        }
        self.expect_keyword("by", "after `INTO user`")?;
        let mut by = vec![self.ident("an identity field after `BY`")?];
        while self.eat_keyword("or") {
            by.push(self.ident("an identity field after `OR`")?);
        }
        self.expect_keyword("alias", "after the identity fields")?;
        let alias = self.ident("a query name after `ALIAS`")?;
        if self.peek().tok == Tok::Semicolon {
            self.next();
        }
        let token = self.peek().clone();
        if token.tok != Tok::Eof {
            return Err(Self::error_at(
                &token,
                format!("unexpected {} after the alias", token.tok),
            ));
        }
        Ok(LqlQuery {
            alias,
            from,
            by,
            fields,
        })
    }

    fn field(&mut self) -> Result<LqlField, LqlError> {
        let start = self.peek().clone();
        let expr = self.expr()?;
        let name = if self.eat_keyword("as") {
            self.ident("a field name after `AS`")?
        } else if let LqlExpr::Field(name) = &expr {
            // `SELECT email, …` keeps the record field's name, as Lytics does.
            name.clone()
        } else {
            return Err(Self::error_at(
                &start,
                "a function expression needs `AS <field>`".to_string(),
            ));
        };
        let mut field = LqlField {
            name,
            expr,
            cond: None,
            kind: None,
            mergeop: None,
            shortdesc: None,
            longdesc: None,
        };
        loop {
            let token = self.peek().clone();
            let duplicate = |what: &str| Self::error_at(&token, format!("`{what}` given twice"));
            if self.eat_keyword("if") {
                if field.cond.is_some() {
                    return Err(duplicate("IF"));
                }
                field.cond = Some(self.cond()?);
            } else if self.eat_keyword("shortdesc") {
                if field.shortdesc.is_some() {
                    return Err(duplicate("SHORTDESC"));
                }
                field.shortdesc = Some(self.string("description after `SHORTDESC`")?);
            } else if self.eat_keyword("longdesc") {
                if field.longdesc.is_some() {
                    return Err(duplicate("LONGDESC"));
                }
                field.longdesc = Some(self.string("description after `LONGDESC`")?);
            } else if self.eat_keyword("kind") {
                if field.kind.is_some() {
                    return Err(duplicate("KIND"));
                }
                let kind_token = self.next();
                let kind = match &kind_token.tok {
                    Tok::Word(w) | Tok::Quoted(w) => w.to_ascii_lowercase(),
                    other => {
                        return Err(Self::error_at(
                            &kind_token,
                            format!("expected a kind after `KIND`, found {other}"),
                        ));
                    }
                };
                if !KINDS.contains(&kind.as_str()) {
                    return Err(Self::error_at(
                        &kind_token,
                        format!("unsupported kind `{kind}` (supported: {})", KINDS.join(", ")),
                    ));
                }
                field.kind = Some(kind);
            } else if self.eat_keyword("mergeop") {
                if field.mergeop.is_some() {
                    return Err(duplicate("MERGEOP"));
                }
                let op_token = self.next();
                let op = match &op_token.tok {
                    Tok::Word(w) | Tok::Quoted(w) => w.to_ascii_lowercase(),
                    other => {
                        return Err(Self::error_at(
                            &op_token,
                            format!("expected a merge op after `MERGEOP`, found {other}"),
                        ));
                    }
                };
                if !MERGE_OPS.contains(&op.as_str()) {
                    return Err(Self::error_at(
                        &op_token,
                        format!(
                            "unsupported merge op `{op}` (supported: {})",
                            MERGE_OPS.join(", ")
                        ),
                    ));
                }
                field.mergeop = Some(op);
            } else {
                break;
            }
        }
        Ok(field)
    }

    fn expr(&mut self) -> Result<LqlExpr, LqlError> {
        let token = self.peek().clone();
        let is_call = matches!(self.tokens.get(self.pos + 1), Some(t) if t.tok == Tok::LParen);
        if let (Tok::Word(name), true) = (&token.tok, is_call) {
            let func = LqlFunc::from_name(name)
                .ok_or_else(|| Self::error_at(&token, format!("unknown function `{name}`")))?;
            self.next();
            self.next();
            let mut args = Vec::new();
            if self.peek().tok != Tok::RParen {
                loop {
                    args.push(self.expr()?);
                    if self.peek().tok == Tok::Comma {
                        self.next();
                        continue;
                    }
                    break;
                }
            }
            self.expect_token(Tok::RParen, &format!("to close `{}(`", func.name()))?;
            let (least, most) = func.arity();
            if args.len() < least || args.len() > most {
                let wanted = if least == most {
                    format!("{least}")
                } else {
                    format!("{least} or {most}")
                };
                return Err(Self::error_at(
                    &token,
                    format!("`{}` takes {wanted} argument(s), got {}", func.name(), args.len()),
                ));
            }
            return Ok(LqlExpr::Call(func, args));
        }
        Ok(LqlExpr::Field(self.ident("a field name or function call")?))
    }

    fn cond(&mut self) -> Result<LqlCond, LqlError> {
        let mut left = self.cond_and()?;
        while self.eat_keyword("or") {
            let right = self.cond_and()?;
            left = LqlCond::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn cond_and(&mut self) -> Result<LqlCond, LqlError> {
        let mut left = self.cond_unary()?;
        while self.eat_keyword("and") {
            let right = self.cond_unary()?;
            left = LqlCond::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn cond_unary(&mut self) -> Result<LqlCond, LqlError> {
        if self.eat_keyword("not") {
            return Ok(LqlCond::Not(Box::new(self.cond_unary()?)));
        }
        if self.peek().tok == Tok::LParen {
            self.next();
            let inner = self.cond()?;
            self.expect_token(Tok::RParen, "to close the condition")?;
            return Ok(inner);
        }
        let token = self.next();
        let name = match &token.tok {
            Tok::Word(w) => w.to_ascii_lowercase(),
            other => {
                return Err(Self::error_at(
                    &token,
                    format!("expected a condition (`exists`, `eq`, `ne`, `NOT`, `(`), found {other}"),
                ));
            }
        };
        if !matches!(name.as_str(), "exists" | "eq" | "ne") {
            return Err(Self::error_at(
                &token,
                format!("unknown condition `{name}` (supported: exists, eq, ne)"),
            ));
        }
        self.expect_token(Tok::LParen, &format!("after `{name}`"))?;
        let expr = self.expr()?;
        if name == "exists" {
            self.expect_token(Tok::RParen, "to close `exists(`")?;
            return Ok(LqlCond::Exists(expr));
        }
        self.expect_token(Tok::Comma, &format!("between the arguments of `{name}`"))?;
        let literal_token = self.next();
        let literal = match literal_token.tok {
            Tok::Str(s) => s,
            // Numbers and booleans may be written bare and compare by their text.
            Tok::Word(ref w)
                if w.parse::<f64>().is_ok()
                    || w.eq_ignore_ascii_case("true")
                    || w.eq_ignore_ascii_case("false") =>
            {
                w.to_ascii_lowercase()
            }
            ref other => {
                return Err(Self::error_at(
                    &literal_token,
                    format!("expected a literal as the second argument of `{name}`, found {other}"),
                ));
            }
        };
        self.expect_token(Tok::RParen, &format!("to close `{name}(`"))?;
        Ok(if name == "eq" {
            LqlCond::Eq(expr, literal)
        } else {
            LqlCond::Ne(expr, literal)
        })
    }
}

fn write_ident(f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
    let bare = !name.is_empty()
        && name.chars().all(is_word_char)
        && !RESERVED.contains(&name.to_ascii_lowercase().as_str());
    if bare {
        f.write_str(name)
    } else {
        write!(f, "`{name}`")
    }
}

fn write_string(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in value.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\t' => f.write_str("\\t")?,
            other => write!(f, "{other}")?,
        }
    }
    f.write_str("\"")
}

impl fmt::Display for LqlExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LqlExpr::Field(name) => write_ident(f, name),
            LqlExpr::Call(func, args) => {
                write!(f, "{}(", func.name())?;
                for (i, arg) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{arg}")?;
                }
                f.write_str(")")
            }
        }
    }
}

impl fmt::Display for LqlCond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LqlCond::Exists(e) => write!(f, "exists({e})"),
            LqlCond::Eq(e, lit) => {
                write!(f, "eq({e}, ")?;
                write_string(f, lit)?;
                f.write_str(")")
            }
            LqlCond::Ne(e, lit) => {
                write!(f, "ne({e}, ")?;
                write_string(f, lit)?;
                f.write_str(")")
            }
            // Parentheses everywhere keep the printed form unambiguous without precedence rules.
            LqlCond::And(a, b) => write!(f, "({a} AND {b})"),
            LqlCond::Or(a, b) => write!(f, "({a} OR {b})"),
            LqlCond::Not(c) => write!(f, "NOT {c}"),
        }
    }
}

impl fmt::Display for LqlField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} AS ", self.expr)?;
        write_ident(f, &self.name)?;
        if let Some(cond) = &self.cond {
            write!(f, " IF {cond}")?;
        }
        if let Some(desc) = &self.shortdesc {
            f.write_str(" SHORTDESC ")?;
            write_string(f, desc)?;
        }
        if let Some(desc) = &self.longdesc {
            f.write_str(" LONGDESC ")?;
            write_string(f, desc)?;
        }
        if let Some(kind) = &self.kind {
            write!(f, " KIND {kind}")?;
        }
        if let Some(op) = &self.mergeop {
            write!(f, " MERGEOP {op}")?;
        }
        Ok(())
    }
}

impl fmt::Display for LqlQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SELECT\n")?;
        for (i, field) in self.fields.iter().enumerate() {
            let sep = if i + 1 < self.fields.len() { "," } else { "" };
            writeln!(f, "    {field}{sep}")?;
        }
        f.write_str("FROM ")?;
        write_ident(f, &self.from)?;
        f.write_str("\nINTO user BY ")?;
        for (i, id) in self.by.iter().enumerate() {
            if i > 0 {
                f.write_str(" OR ")?;
            }
            write_ident(f, id)?;
        }
        f.write_str("\nALIAS ")?;
        write_ident(f, &self.alias)
    }
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test should fail loudly at the broken step"
)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const CUSTOMERIO_QUERY: &str = r#"SELECT
    email(email) AS email SHORTDESC "Email" KIND string MERGEOP latest,
    set(cio_campaign_ids) AS cio_campaign_ids SHORTDESC "Customer.io campaign ids" KIND []string MERGEOP merge,
    valuect(cio_events) AS cio_events KIND map[string]intsum MERGEOP merge,
    valuect(cio_hourlyopens) AS cio_hourlyopens KIND map[string]intsum MERGEOP merge,
    todate(cio_last_open_ts) AS cio_last_open_ts KIND date MERGEOP max,
    set(cio_subjects) AS cio_subjects KIND []string MERGEOP merge,
    todate(last_active_ts) AS last_active_ts KIND date MERGEOP max
FROM customerio_events
INTO user BY email
ALIAS customerio_user_fields
"#;

    fn field(name: &str) -> LqlExpr {
        LqlExpr::Field(name.to_string())
    }

    fn call(func: LqlFunc, arg: LqlExpr) -> LqlExpr {
        LqlExpr::Call(func, vec![arg])
    }

    fn check_error(text: &str, message_part: &str, line: usize, column: usize) {
        let err = parse_lql(text).expect_err("query should not parse");
        assert!(
            err.message.contains(message_part),
            "message {:?} should contain {message_part:?}",
            err.message
        );
        assert_eq!(
            (err.line, err.column),
            (line, column),
            "position of {:?}",
            err.message
        );
    }

    #[test]
    fn parses_the_customerio_query() {
        let q = parse_lql(CUSTOMERIO_QUERY).expect("parses");
        assert_eq!(q.alias, "customerio_user_fields");
        assert_eq!(q.from, "customerio_events");
        assert_eq!(q.by, vec!["email"]);
        let names: Vec<&str> = q.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "email",
                "cio_campaign_ids",
                "cio_events",
                "cio_hourlyopens",
                "cio_last_open_ts",
                "cio_subjects",
                "last_active_ts"
            ]
        );
        let email = &q.fields[0];
        assert_eq!(email.expr, call(LqlFunc::Email, field("email")));
        assert_eq!(email.shortdesc.as_deref(), Some("Email"));
        assert_eq!(email.kind.as_deref(), Some("string"));
        assert_eq!(email.mergeop.as_deref(), Some("latest"));
        assert_eq!(q.fields[1].kind.as_deref(), Some("[]string"));
        assert_eq!(q.fields[1].shortdesc.as_deref(), Some("Customer.io campaign ids"));
        assert_eq!(q.fields[2].expr, call(LqlFunc::ValueCt, field("cio_events")));
        assert_eq!(q.fields[2].kind.as_deref(), Some("map[string]intsum"));
        assert_eq!(q.fields[4].expr, call(LqlFunc::ToDate, field("cio_last_open_ts")));
        assert_eq!(q.fields[4].mergeop.as_deref(), Some("max"));
        assert!(q.fields.iter().all(|f| f.cond.is_none()));
    }

    #[test]
    fn printed_query_parses_back_to_the_same_query() {
        let q = parse_lql(CUSTOMERIO_QUERY).expect("parses");
        let again = parse_lql(&q.to_string()).expect("printed form parses");
        assert_eq!(q, again);

        let tricky = r#"select max(todate(`ts field`)) as `select` if (exists(a) or not eq(b, "x\"y")) and ne(c, 3), d from `s` into USER by `d` or e alias `my query`"#;
        let q = parse_lql(tricky).expect("parses");
        assert_eq!(parse_lql(&q.to_string()).expect("printed form parses"), q);
    }

    #[test]
    fn keywords_are_case_insensitive_and_comments_and_backquotes_work() {
        let q = parse_lql(
            "-- a comment\nselect Set(`cio.events`) As evs -- trailing comment\n  kind []STRING,\n hourofday() as hod,\n epochms() AS seen, count() as n\nFrom `cio_events` Into User By `email` Or user_id Alias q1;",
        )
        .expect("parses");
        assert_eq!(q.from, "cio_events");
        assert_eq!(q.by, vec!["email", "user_id"]);
        assert_eq!(q.fields[0].expr, call(LqlFunc::Set, field("cio.events")));
        assert_eq!(q.fields[0].kind.as_deref(), Some("[]string"));
        assert_eq!(q.fields[1].expr, LqlExpr::Call(LqlFunc::HourOfDay, vec![]));
        assert_eq!(q.fields[2].expr, LqlExpr::Call(LqlFunc::EpochMs, vec![]));
    }

    #[test]
    fn bare_field_without_as_keeps_its_name() {
        let q = parse_lql("SELECT user_id, email(email) AS email FROM s INTO user BY user_id ALIAS a")
            .expect("parses");
        assert_eq!(q.fields[0].name, "user_id");
    }

    #[test]
    fn conditions_bind_and_tighter_than_or() {
        let q = parse_lql(
            r#"SELECT x AS y IF exists(a) OR eq(b, "1") AND NOT ne(c, "2") FROM s INTO user BY y ALIAS q"#,
        )
        .expect("parses");
        let expected = LqlCond::Or(
            Box::new(LqlCond::Exists(field("a"))),
            Box::new(LqlCond::And(
                Box::new(LqlCond::Eq(field("b"), "1".into())),
                Box::new(LqlCond::Not(Box::new(LqlCond::Ne(field("c"), "2".into())))),
            )),
        );
        assert_eq!(q.fields[0].cond, Some(expected));
    }

    #[test]
    fn errors_name_the_problem_and_its_position() {
        check_error(
            "SELEC x AS y FROM s INTO user BY y ALIAS q",
            "expected `SELECT`",
            1,
            1,
        );
        check_error(
            "SELECT foo(x) AS y FROM s INTO user BY y ALIAS q",
            "unknown function `foo`",
            1,
            8,
        );
        check_error(
            "SELECT x AS y\n  KIND map[string]float FROM s INTO user BY y ALIAS q",
            "unsupported kind `map[string]float`",
            2,
            8,
        );
        check_error(
            "SELECT x AS y MERGEOP newest FROM s INTO user BY y ALIAS q",
            "unsupported merge op `newest`",
            1,
            23,
        );
        check_error("SELECT x AS y FROM s INTO user ALIAS q", "expected `BY`", 1, 32);
        check_error(
            "SELECT x AS y FROM s INTO account BY y ALIAS q",
            "only `INTO user`",
            1,
            27,
        );
        check_error(
            "SELECT set(x AS y FROM s INTO user BY y ALIAS q",
            "to close `set(`",
            1,
            14,
        );
        check_error(
            "SELECT x AS y SHORTDESC \"open FROM s",
            "unterminated string",
            1,
            25,
        );
        check_error(
            "SELECT x AS y, z AS y FROM s INTO user BY y ALIAS q",
            "selected twice",
            1,
            16,
        );
        check_error(
            "SELECT set(a, b) AS y FROM s INTO user BY y ALIAS q",
            "takes 1 argument(s), got 2",
            1,
            8,
        );
        check_error(
            "SELECT x AS y FROM s INTO user BY y ALIAS q extra",
            "unexpected `extra`",
            1,
            45,
        );
        check_error(
            "SELECT x AS y IF like(x, \"a\") FROM s INTO user BY y ALIAS q",
            "unknown condition `like`",
            1,
            18,
        );
        check_error("", "expected `SELECT`", 1, 1);
    }

    #[test]
    fn error_display_includes_the_position() {
        let err = parse_lql("SELECT x AS y FROM s INTO user BY y").expect_err("no alias");
        assert_eq!(
            err.to_string(),
            "expected `ALIAS` after the identity fields, found end of query at line 1, column 36"
        );
    }
}
