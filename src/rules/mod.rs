//! The rules stage: YAML rule files compiled once and evaluated as pure functions.
//!
//! Input: an event document (a Signal canonical event or a Customer.io webhook: JSON, or any
//! [`Document`] that answers plain paths as its JSON would) and the integration's non-secret
//! values. Output: a [`Mapping`]: the Lytics records to queue, the
//! records refused (with the reason) and the rules that matched. Every JSONPath is parsed when
//! rules load; a rule set that fails to compile never runs. The live set sits behind an atomic
//! swap ([`LiveRules`]): a reload compiles to the side and swaps only on success.
//!
//! This module does no I/O while evaluating and never sees a secret.

pub mod cases;
mod compile;
pub(crate) mod flatten;
pub mod lql;
pub mod model;
pub mod path;
mod record;
mod spec;
pub mod transform;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

pub use compile::{CompiledFile, DEFAULT_TIMESTAMP_FIELD, RuleProblem};
pub use flatten::flatten_into;
pub use model::{
    DroppedRecord, Explain, FieldKind, IntegrationContext, MappedRecord, MergeOp, RecordKind, Rule, Source,
};
pub use path::{Document, Val};
pub use record::Fields;
pub use spec::{ExpectedRecordSpec, RuleFileSpec, TestCaseSpec};

/// The rule files shipped with the relay (every file of `rules/`, in name order, as
/// [`RuleSet::load`] reads a directory), used when no rules directory is given or found.
pub const EMBEDDED: &[(&str, &str)] = &[
    (
        "rules/customerio.yaml",
        include_str!("../../rules/customerio.yaml"),
    ),
    ("rules/signal.yaml", include_str!("../../rules/signal.yaml")),
];

/// Every problem found while loading rules.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The rules could not be read.
    #[error("cannot read rules at `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The directory holds no rule file.
    #[error("no rule files (*.yaml, *.yml) in `{0}`")]
    Empty(PathBuf),
    /// The rules do not compile.
    #[error("{} problem(s) in the rules:\n{}", .0.len(), .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<RuleProblem>),
}

/// A compiled, immutable rule set with a version (a content hash).
#[derive(Debug)]
pub struct RuleSet {
    version: Arc<str>,
    files: Vec<CompiledFile>,
    specs: Vec<(String, PathBuf, RuleFileSpec)>,
    signal: Vec<Rule>,
    customerio: Vec<Rule>,
}

/// What the rules made of one event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mapping<'a> {
    /// Records to queue.
    pub records: Vec<MappedRecord<'a>>,
    /// Records refused, with the reason.
    pub dropped: Vec<DroppedRecord>,
}

impl RuleSet {
    /// Loads every `*.yaml` / `*.yml` file of a directory (in name order), or one file.
    pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
        let io = |source| RulesError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect();
            entries.sort();
            if entries.is_empty() {
                return Err(RulesError::Empty(path.to_path_buf()));
            }
            for p in entries {
                let text = std::fs::read_to_string(&p).map_err(|source| RulesError::Io {
                    path: p.clone(),
                    source,
                })?;
                files.push((p.display().to_string(), p, text));
            }
        } else {
            let text = std::fs::read_to_string(path).map_err(io)?;
            files.push((path.display().to_string(), path.to_path_buf(), text));
        }
        Self::compile(files)
    }

    /// The shipped rules, compiled.
    pub fn embedded() -> Result<RuleSet, RulesError> {
        Self::compile(
            EMBEDDED
                .iter()
                .map(|(n, t)| (n.to_string(), PathBuf::from(n), t.to_string()))
                .collect(),
        )
    }

    /// Compiles named texts: `(name, path, text)`.
    pub fn compile(files: Vec<(String, PathBuf, String)>) -> Result<RuleSet, RulesError> {
        let mut hasher = Sha256::new();
        let mut problems = Vec::new();
        let mut compiled = Vec::new();
        let mut specs = Vec::new();
        for (name, path, text) in &files {
            hasher.update(name.rsplit('/').next().unwrap_or(name).as_bytes());
            hasher.update([0]);
            hasher.update(text.as_bytes());
            hasher.update([0]);
            match compile::compile_file(name, text) {
                Ok((file, spec)) => {
                    compiled.push(file);
                    specs.push((name.clone(), path.clone(), spec));
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        problems.extend(cross_checks(&compiled, &files));
        // Reported in reading order: file, then line, then column.
        problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        if !problems.is_empty() {
            return Err(RulesError::Invalid(problems));
        }
        let digest = hasher.finalize();
        let version: String = hex::encode(&digest[..6]);
        let by = |s: Source| {
            compiled
                .iter()
                .filter(|f| f.source == s)
                .flat_map(|f| f.rules.iter().cloned())
                .collect::<Vec<_>>()
        };
        Ok(RuleSet {
            version: Arc::from(version),
            signal: by(Source::Signal),
            customerio: by(Source::CustomerIo),
            files: compiled,
            specs,
        })
    }

    /// The content hash naming this set.
    pub fn version(&self) -> &Arc<str> {
        &self.version
    }

    /// The compiled files.
    pub fn files(&self) -> &[CompiledFile] {
        &self.files
    }

    /// The rule files as written, with their paths (for test cases).
    pub fn specs(&self) -> &[(String, PathBuf, RuleFileSpec)] {
        &self.specs
    }

    /// The rules for a source, in evaluation order.
    pub fn rules(&self, source: Source) -> &[Rule] {
        match source {
            Source::Signal => &self.signal,
            Source::CustomerIo => &self.customerio,
        }
    }

    /// Maps one event. Every rule of the source whose `when` holds produces a record or a
    /// refusal.
    pub fn evaluate<'a, D: Document + ?Sized>(
        &'a self,
        source: Source,
        doc: &'a D,
        ctx: &IntegrationContext,
    ) -> Mapping<'a> {
        self.evaluate_inner(source, doc, ctx, None)
    }

    /// Maps one event and says where every output field came from.
    pub fn explain<'a, D: Document + ?Sized>(
        &'a self,
        source: Source,
        doc: &'a D,
        ctx: &IntegrationContext,
    ) -> (Mapping<'a>, Explain) {
        let mut explain = Explain::default();
        let mapping = self.evaluate_inner(source, doc, ctx, Some(&mut explain));
        (mapping, explain)
    }

    fn evaluate_inner<'a, D: Document + ?Sized>(
        &'a self,
        source: Source,
        doc: &'a D,
        ctx: &IntegrationContext,
        mut explain: Option<&mut Explain>,
    ) -> Mapping<'a> {
        let mut mapping = Mapping::default();
        for rule in self.rules(source) {
            match rule.apply(doc, ctx, explain.as_deref_mut()) {
                Some(Ok(record)) => mapping.records.push(record),
                Some(Err(dropped)) => mapping.dropped.push(dropped),
                None => {}
            }
        }
        mapping
    }
}

/// The rule (and its file) that first declared a user field, with its merge op and kind.
type FieldSemantics<'a> = (&'a str, &'a str, Option<MergeOp>, Option<FieldKind>);

/// Problems that span rules: two rules writing one user field with different semantics.
fn cross_checks(files: &[CompiledFile], texts: &[(String, PathBuf, String)]) -> Vec<RuleProblem> {
    let mut seen: std::collections::HashMap<(String, &str), FieldSemantics> =
        std::collections::HashMap::new();
    let mut problems = Vec::new();
    // Rule names are how the live view, dead letters and remapping replays name a rule: one
    // name, one rule, among the rules of a source.
    let mut names: std::collections::HashMap<(Source, &str), &str> = std::collections::HashMap::new();
    for file in files {
        let text = texts
            .iter()
            .find(|(n, _, _)| **n == *file.file)
            .map(|(_, _, t)| t.as_str())
            .unwrap_or("");
        for rule in &file.rules {
            match names.get(&(file.source, &*rule.name)) {
                Some(first) if *first != &*file.file => {
                    let (line, column) = compile::locate(text, Some(&rule.name), "");
                    problems.push(RuleProblem {
                        file: file.file.to_string(),
                        line,
                        column,
                        rule: Some(rule.name.to_string()),
                        message: format!("rule `{}` is also defined in {first}", rule.name),
                        hint: Some("give every rule of the set a unique name".into()),
                    });
                }
                Some(_) => {}
                None => {
                    names.insert((file.source, &rule.name), &file.file);
                }
            }
        }
        for rule in &file.rules {
            let stream = rule.stream.as_deref().unwrap_or("").to_string();
            for field in rule
                .fields
                .iter()
                .filter(|f| f.merge.is_some() || f.kind.is_some())
            {
                let key = (stream.clone(), &*field.name);
                match seen.get(&key) {
                    Some((other, other_file, merge, kind))
                        if (*merge, *kind) != (field.merge, field.kind) =>
                    {
                        let (line, column) = compile::locate(text, Some(&rule.name), &field.name);
                        problems.push(RuleProblem {
                            file: file.file.to_string(),
                            line,
                            column,
                            rule: Some(rule.name.to_string()),
                            message: format!(
                                "field `{}` is merged as {} here but as {} by rule `{other}` in {other_file}",
                                field.name,
                                semantics(field.merge, field.kind),
                                semantics(*merge, *kind)
                            ),
                            hint: Some("a user field has one merge op and kind: make the rules agree".into()),
                        });
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(key, (&rule.name, &file.file, field.merge, field.kind));
                    }
                }
            }
        }
    }
    problems
}

fn semantics(merge: Option<MergeOp>, kind: Option<FieldKind>) -> String {
    format!(
        "`{}` ({})",
        merge.map(MergeOp::name).unwrap_or("latest"),
        kind.map(FieldKind::name).unwrap_or("any kind")
    )
}

/// The rule set in force, swapped atomically on reload.
#[derive(Debug, Clone)]
pub struct LiveRules {
    current: Arc<ArcSwap<RuleSet>>,
}

impl LiveRules {
    /// Starts with `set`.
    pub fn new(set: RuleSet) -> Self {
        LiveRules {
            current: Arc::new(ArcSwap::from_pointee(set)),
        }
    }

    /// The set in force; an event holds it for its whole evaluation, so a reload never mixes
    /// two sets in one event.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.load_full()
    }

    /// Puts `set` in force.
    pub fn swap(&self, set: RuleSet) -> Arc<RuleSet> {
        self.current.swap(Arc::new(set))
    }
}

#[cfg(test)]
mod tests;
