//! YAML that keeps its positions. A document is read once by serde-saphyr into a [`Document`]: a tree of
//! nodes, each with the line and column of its value (and of its key, in a mapping) and its key path
//! (`services[1].route`). Typed values are then deserialized from that tree ([`Document::deserialize`])
//! rather than from the text, which is what lets Vigil report every bad value in a file at once: a value a
//! type refuses is recorded, left out, and the rest of the file is read on (see `de`). Checks made after
//! parsing locate their findings through [`Document::locate`] by key path, so no issue goes without a real
//! line and column.

mod de;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::{self as serde_de, DeserializeOwned};
use serde_saphyr::{Location, Spanned};

use crate::issue::ConfigIssue;

/// A line and column in the file, both from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl Pos {
    /// The start of the document: where issues about the file as a whole are reported.
    pub const START: Pos = Pos { line: 1, column: 1 };

    fn of(location: &Location) -> Option<Pos> {
        (location.line() > 0).then(|| Pos { line: location.line(), column: location.column() })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
}

#[derive(Debug)]
pub(crate) enum Kind {
    /// `text` is the scalar as written (for a number asked for as a string, e.g. `version: 2`).
    Scalar {
        value: Scalar,
        text: String,
    },
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

/// One value of the document.
#[derive(Debug)]
pub(crate) struct Node {
    /// Unique in its document; what a refused value is remembered by.
    pub id: usize,
    pub pos: Pos,
    pub path: String,
    pub kind: Kind,
}

/// A parsed YAML document with the position and key path of every value.
#[derive(Debug)]
pub struct Document {
    file: String,
    root: Node,
    /// Key path → where an issue about it points: a scalar's value, or a collection's key.
    positions: BTreeMap<String, Pos>,
}

impl Document {
    /// Reads `text`. A YAML syntax error is the one issue there is: nothing after it can be read.
    pub fn parse(text: &str, file: &str) -> Result<Document, ConfigIssue> {
        let raw: Option<RawNode> = serde_saphyr::from_str(text).map_err(|e| saphyr_issue(file, "", &e))?;
        let mut builder = Builder { text, next_id: 0, positions: BTreeMap::new() };
        let root = match raw {
            Some(raw) => builder.node(raw, String::new(), Pos::START),
            None => builder.node(
                RawNode { pos: Some(Pos::START), kind: RawKind::Scalar(Scalar::Null), text: None },
                String::new(),
                Pos::START,
            ),
        };
        Ok(Document { file: file.to_string(), root, positions: builder.positions })
    }

    /// The file name issues carry.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// True for an empty document (no content, or only comments).
    pub fn is_empty(&self) -> bool {
        matches!(self.root.kind, Kind::Scalar { value: Scalar::Null, .. })
    }

    /// Where `path` is written, or its nearest written ancestor (a default that causes a mistake is
    /// reported at the section that would have set it), or the document's start.
    pub fn locate(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(cut) => p = &p[..cut],
                None => return self.positions.get("").copied().unwrap_or(Pos::START),
            }
        }
    }

    /// True when the file writes `path` itself.
    pub fn has(&self, path: &str) -> bool {
        self.positions.contains_key(path)
    }

    /// An issue at `path`, located by [`Document::locate`].
    pub fn issue(&self, path: &str, message: impl Into<String>) -> ConfigIssue {
        let pos = self.locate(path);
        ConfigIssue {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            path: path.to_string(),
            message: message.into(),
        }
    }

    /// Deserializes the whole document as `T`, going on past every value `T` refuses: each refusal is an
    /// issue, and the value is left out (its field takes its default). `None` when what remains still
    /// cannot make a `T`.
    pub fn deserialize<T: DeserializeOwned>(&self) -> (Option<T>, Vec<ConfigIssue>) {
        de::deserialize_recovering(self)
    }
}

/// Deserializes a YAML document, stopping at the first syntax or type error, which comes back with its
/// position and key path. For files that report one mistake at a time (rule files).
pub fn from_yaml<T: DeserializeOwned>(text: &str, file: &str) -> Result<T, ConfigIssue> {
    // serde_path_to_error knows where in the document an error arose; serde-saphyr knows the position.
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| {
        let path = if path == "." { String::new() } else { without_spans(&path) };
        saphyr_issue(file, &path, &e)
    })
}

/// `path` without the steps `Spanned<T>` adds of its own: a `value` step after each spanned value, which
/// for a spanned list carries the index (`steps.value[0].value.name` is `steps[0].name`).
fn without_spans(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for step in path.split('.') {
        match step.strip_prefix("value") {
            Some("") => {}
            Some(index) if index.starts_with('[') => out.push_str(index),
            _ => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(step);
            }
        }
    }
    out
}

fn saphyr_issue(file: &str, path: &str, e: &serde_saphyr::Error) -> ConfigIssue {
    let pos = e.location().as_ref().and_then(Pos::of).unwrap_or(Pos::START);
    // The rendered error repeats the position ("line 2 column 3: ...") and may add a source snippet; keep
    // the first line's message only.
    let rendered = e.to_string();
    let first = rendered.lines().next().unwrap_or("").trim().trim_start_matches("error: ");
    let message = match first.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((_, m)) => m,
        None => first,
    };
    ConfigIssue {
        file: file.to_string(),
        line: pos.line,
        column: pos.column,
        path: path.to_string(),
        message: message.to_string(),
    }
}

/// A node as serde-saphyr hands it over: positions, no paths yet.
struct RawNode {
    pos: Option<Pos>,
    kind: RawKind,
    /// The bytes the scalar was written as, when serde-saphyr knows them.
    text: Option<(usize, usize)>,
}

enum RawKind {
    Scalar(Scalar),
    Seq(Vec<RawNode>),
    Map(Vec<(Spanned<RawKey>, RawNode)>),
}

impl<'de> Deserialize<'de> for RawNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<RawKind>::deserialize(d)?;
        let span = spanned.referenced.span();
        let text = span
            .byte_offset()
            .zip(span.byte_len())
            .and_then(|(o, l)| Some((usize::try_from(o).ok()?, usize::try_from(l).ok()?)));
        Ok(RawNode { pos: Pos::of(&spanned.referenced), kind: spanned.value, text })
    }
}

impl<'de> Deserialize<'de> for RawKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> serde_de::Visitor<'de> for RawVisitor {
    type Value = RawKind;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<RawKind, E> {
        Ok(RawKind::Scalar(Scalar::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<RawKind, E> {
        Ok(RawKind::Scalar(Scalar::Int(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<RawKind, E> {
        Ok(RawKind::Scalar(Scalar::Uint(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<RawKind, E> {
        Ok(RawKind::Scalar(Scalar::Float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<RawKind, E> {
        Ok(RawKind::Scalar(Scalar::Str(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<RawKind, E> {
        Ok(RawKind::Scalar(Scalar::Str(v)))
    }
    fn visit_unit<E>(self) -> Result<RawKind, E> {
        Ok(RawKind::Scalar(Scalar::Null))
    }
    fn visit_none<E>(self) -> Result<RawKind, E> {
        Ok(RawKind::Scalar(Scalar::Null))
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<RawKind, D::Error> {
        RawKind::deserialize(d)
    }
    fn visit_seq<A: serde_de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawKind, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<RawNode>()? {
            items.push(item);
        }
        Ok(RawKind::Seq(items))
    }
    fn visit_map<A: serde_de::MapAccess<'de>>(self, mut map: A) -> Result<RawKind, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<RawKey>>()? {
            let value = map.next_value::<RawNode>()?;
            entries.push((key, value));
        }
        Ok(RawKind::Map(entries))
    }
}

/// A mapping key: Vigil's keys are words, but a number or a boolean written as a key reads as its text.
struct RawKey(String);

impl<'de> Deserialize<'de> for RawKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match RawKind::deserialize(d)? {
            RawKind::Scalar(s) => Ok(RawKey(scalar_text(&s))),
            _ => Err(serde_de::Error::custom("a mapping key must be a plain value, not a list or a mapping")),
        }
    }
}

fn scalar_text(s: &Scalar) -> String {
    match s {
        Scalar::Null => "null".into(),
        Scalar::Bool(b) => b.to_string(),
        Scalar::Int(i) => i.to_string(),
        Scalar::Uint(u) => u.to_string(),
        Scalar::Float(f) => f.to_string(),
        Scalar::Str(s) => s.clone(),
    }
}

struct Builder<'t> {
    text: &'t str,
    next_id: usize,
    positions: BTreeMap<String, Pos>,
}

impl Builder<'_> {
    /// `fallback` is where a node without a position of its own points: its key, or its parent.
    fn node(&mut self, raw: RawNode, path: String, fallback: Pos) -> Node {
        let id = self.next_id;
        self.next_id += 1;
        let pos = raw.pos.unwrap_or(fallback);
        let kind = match raw.kind {
            RawKind::Scalar(value) => {
                let text = match &value {
                    Scalar::Str(s) => s.clone(),
                    // A number or a boolean as written, so `version: 1.10` stays `1.10` where a string is
                    // asked for.
                    other => raw
                        .text
                        .and_then(|(offset, len)| self.text.get(offset..offset + len))
                        .map(|t| t.trim().to_string())
                        .filter(|t| !t.is_empty())
                        .unwrap_or_else(|| scalar_text(other)),
                };
                self.positions.entry(path.clone()).or_insert(pos);
                Kind::Scalar { value, text }
            }
            RawKind::Seq(items) => {
                self.positions.entry(path.clone()).or_insert(pos);
                Kind::Seq(
                    items
                        .into_iter()
                        .enumerate()
                        .map(|(i, item)| self.node(item, format!("{path}[{i}]"), pos))
                        .collect(),
                )
            }
            RawKind::Map(entries) => {
                self.positions.entry(path.clone()).or_insert(pos);
                Kind::Map(
                    entries
                        .into_iter()
                        .map(|(key, value)| {
                            let key_pos = Pos::of(&key.referenced).unwrap_or(pos);
                            let key = key.value.0;
                            let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                            // A collection is pointed at by its key; a scalar by its value (below).
                            if !matches!(value.kind, RawKind::Scalar(_)) {
                                self.positions.insert(child.clone(), key_pos);
                            }
                            let value = self.node(value, child, key_pos);
                            Entry { key, key_pos, value }
                        })
                        .collect(),
                )
            }
        };
        Node { id, pos, path, kind }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
collector:
  interval: 1s
  watch: { include: [\"/\", /a] }
services:
  - name: echo
    port: 18080
    version: 1.10
";

    #[test]
    fn every_value_has_its_position_and_path() {
        let doc = Document::parse(TEXT, "v.yaml").unwrap();
        assert_eq!(doc.locate("collector.interval"), Pos { line: 2, column: 13 });
        assert_eq!(doc.locate("collector.watch"), Pos { line: 3, column: 3 });
        assert_eq!(doc.locate("collector.watch.include[1]"), Pos { line: 3, column: 27 });
        assert_eq!(doc.locate("services"), Pos { line: 4, column: 1 });
        assert_eq!(doc.locate("services[0]"), Pos { line: 5, column: 5 });
        assert_eq!(doc.locate("services[0].port"), Pos { line: 6, column: 11 });
        // Not written: its nearest written ancestor.
        assert_eq!(doc.locate("services[0].route"), Pos { line: 5, column: 5 });
        assert_eq!(doc.locate("broker.listen"), Pos::START);
        assert!(doc.has("services[0].name"));
        assert!(!doc.has("services[0].route"));
    }

    #[test]
    fn numbers_keep_their_text() {
        let doc = Document::parse(TEXT, "v.yaml").unwrap();
        let Kind::Map(top) = &doc.root.kind else { panic!("not a map") };
        let Kind::Seq(services) = &top[1].value.kind else { panic!("not a list") };
        let Kind::Map(echo) = &services[0].kind else { panic!("not a map") };
        let Kind::Scalar { value, text } = &echo[2].value.kind else { panic!("not a scalar") };
        assert_eq!(*value, Scalar::Float(1.1));
        assert_eq!(text, "1.10");
    }

    #[test]
    fn a_syntax_error_is_located() {
        let e = Document::parse("a: [1, 2\nb: 3\n", "v.yaml").unwrap_err();
        assert_eq!(e.file, "v.yaml");
        assert!(e.line >= 1, "{e:?}");
    }

    #[test]
    fn a_first_mistake_has_the_key_path_as_written() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Step {
            #[allow(dead_code)]
            name: String,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[allow(dead_code)]
            steps: serde_saphyr::Spanned<Vec<serde_saphyr::Spanned<Step>>>,
            #[allow(dead_code)]
            names: Vec<serde_saphyr::Spanned<String>>,
        }
        let e =
            from_yaml::<File>("names: [a]\nsteps:\n  - { name: a }\n  - { nam: b }\n", "w.yaml").unwrap_err();
        assert_eq!((e.line, e.column, e.path.as_str()), (4, 7, "steps[1].nam"));
        let e = from_yaml::<File>("steps: []\nnames: [a, [b]]\n", "w.yaml").unwrap_err();
        assert_eq!(e.path, "names[1]");
        assert_eq!(without_spans("a.value[0].value.b.value"), "a[0].b");
        assert_eq!(without_spans("values.value_x"), "values.value_x");
    }

    #[test]
    fn an_empty_document_is_empty() {
        assert!(Document::parse("", "v.yaml").unwrap().is_empty());
        assert!(Document::parse("# only a comment\n", "v.yaml").unwrap().is_empty());
        assert!(!Document::parse("a: 1\n", "v.yaml").unwrap().is_empty());
    }
}
