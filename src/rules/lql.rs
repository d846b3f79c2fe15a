//! LQL from the rules: the query that makes Lytics merge user fields exactly as the rules
//! declare (REFERENCE §4), so the rule files stay the single source of truth.
//!
//! Input: compiled rule files. Output: one `SELECT … FROM <stream> INTO user BY <identity>
//! ALIAS <alias>` query per file that declares merged fields. Pure.

use super::compile::CompiledFile;
use super::model::{FieldKind, FieldRule, MergeOp, Rule};

/// One generated query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LqlQuery {
    /// The rule file it came from.
    pub file: String,
    /// The query's alias.
    pub alias: String,
    /// The LQL text.
    pub text: String,
}

/// The queries of every file with merged fields: one per stream its rules write to (the
/// file's, or a rule's own `stream:`); rules without one write to `default_stream` (the
/// integration's `stream_name`).
pub fn queries(files: &[CompiledFile], default_stream: &str) -> Vec<LqlQuery> {
    files
        .iter()
        .flat_map(|f| file_queries(f, default_stream))
        .collect()
}

fn file_queries(file: &CompiledFile, default_stream: &str) -> Vec<LqlQuery> {
    let file_stream = file.stream.clone().unwrap_or_else(|| default_stream.to_string());
    // The streams the rules write to, the file's first.
    let mut streams: Vec<String> = vec![file_stream.clone()];
    for rule in &file.rules {
        let s = rule
            .stream
            .as_deref()
            .map_or_else(|| default_stream.to_string(), str::to_string);
        if !streams.contains(&s) {
            streams.push(s);
        }
    }
    let base_alias = file
        .alias
        .clone()
        .unwrap_or_else(|| format!("{file_stream}_user_fields"));
    streams
        .into_iter()
        .filter_map(|stream| {
            let rules: Vec<&Rule> = file
                .rules
                .iter()
                .filter(|r| r.stream.as_deref().unwrap_or(default_stream) == stream)
                .collect();
            let alias = if stream == file_stream {
                base_alias.clone()
            } else {
                format!("{base_alias}_{stream}")
            };
            query(&file.file, &rules, &stream, alias)
        })
        .collect()
}

fn query(file: &str, rules: &[&Rule], stream: &str, alias: String) -> Option<LqlQuery> {
    let mut fields: Vec<&FieldRule> = Vec::new();
    let mut identity: Vec<String> = Vec::new();
    for rule in rules {
        for f in rule.fields.iter().filter(|f| f.merge.is_some()) {
            if !fields.iter().any(|g| g.name == f.name) {
                fields.push(f);
            }
        }
        for id in rule.identity.iter() {
            if !identity.iter().any(|i| **i == **id) {
                identity.push(id.to_string());
            }
        }
    }
    if fields.is_empty() {
        return None;
    }
    // The query stitches by the identity fields, so it selects them, merged or not.
    for rule in rules {
        for f in rule
            .fields
            .iter()
            .filter(|f| rule.identity.iter().any(|i| **i == *f.name))
        {
            if !fields.iter().any(|g| g.name == f.name) {
                fields.push(f);
            }
        }
    }
    let lines: Vec<String> = fields
        .iter()
        .map(|f| select_item(f, identity.iter().any(|i| **i == *f.name)))
        .collect();
    let by = if identity.is_empty() {
        "email".to_string()
    } else {
        identity.iter().map(|i| ident(i)).collect::<Vec<_>>().join(" OR ")
    };
    let text = format!(
        "SELECT\n    {}\nFROM {}\nINTO user BY {}\nALIAS {}\n",
        lines.join(",\n    "),
        ident(stream),
        by,
        ident(&alias)
    );
    Some(LqlQuery {
        file: file.to_string(),
        alias,
        text,
    })
}

fn select_item(f: &FieldRule, is_identity: bool) -> String {
    let name = ident(&f.name);
    let op = f.merge.unwrap_or(MergeOp::Latest);
    let kind = f.kind.unwrap_or(FieldKind::String);
    let (expr, mergeop) = match (op, kind) {
        (MergeOp::Set, _) => (format!("set({name})"), "merge"),
        (MergeOp::Count, _) => (format!("valuect({name})"), "merge"),
        (MergeOp::Max | MergeOp::Min | MergeOp::Latest | MergeOp::Oldest, FieldKind::Date) => {
            (format!("todate({name})"), op.name())
        }
        (MergeOp::Latest | MergeOp::Oldest, FieldKind::String) if is_identity && &*f.name == "email" => {
            (format!("email({name})"), op.name())
        }
        (MergeOp::Sum, _) => (name.clone(), "sum"),
        (_, _) => (name.clone(), op.name()),
    };
    let mut item = format!("{expr} AS {name}");
    if let Some(d) = &f.description {
        // An LQL string: quotes and backslashes escaped.
        item.push_str(&format!(
            " SHORTDESC \"{}\"",
            d.replace('\\', "\\\\").replace('"', "\\\"")
        ));
    }
    item.push_str(&format!(" KIND {} MERGEOP {mergeop}", kind.name()));
    item
}

/// Backquotes identifiers that are not plain words.
fn ident(name: &str) -> String {
    if !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
    {
        name.to_string()
    } else {
        format!("`{}`", name.replace('`', ""))
    }
}
