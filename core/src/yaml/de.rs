//! Typed values from a [`Document`]'s tree, going on past refused values.
//!
//! serde stops at the first error a `Deserialize` impl returns. To report every bad value of a file at
//! once, [`deserialize_recovering`] runs the deserialization again after each error, with the offending
//! node left out: a mapping entry whose value (or key) was refused is skipped, so its field takes its
//! default; a refused list item is skipped. The tree is read-only and every error names the node it arose
//! at, so each run makes progress and the number of runs is bounded by the number of mistakes. A struct
//! that then lacks a required field because its value was refused is left out in turn, without a second
//! issue for the same mistake.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

use super::{Document, Entry, Kind, Node, Pos, Scalar};
use crate::issue::ConfigIssue;

/// Where an error arose: the node to leave out next time, and what the issue points at.
#[derive(Clone, Debug)]
struct At {
    node: usize,
    pos: Pos,
    path: String,
}

#[derive(Debug)]
pub(super) struct Error {
    message: String,
    /// Set for serde's "missing field" errors, which may be the echo of a refused value.
    missing_field: Option<&'static str>,
    at: Option<At>,
}

impl Error {
    /// Attributes the error to `node` unless a node further in already claimed it.
    fn or_at(mut self, node: &Node) -> Self {
        if self.at.is_none() {
            self.at = Some(At { node: node.id, pos: node.pos, path: node.path.clone() });
        }
        self
    }

    /// Attributes the error to a mapping key (unknown field, bad key): the entry is what is left out.
    fn or_at_key(mut self, entry: &Entry, parent: &Node) -> Self {
        if self.at.is_none() {
            let path = if parent.path.is_empty() {
                entry.key.clone()
            } else {
                format!("{}.{}", parent.path, entry.key)
            };
            self.at = Some(At { node: entry.value.id, pos: entry.key_pos, path });
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error { message: msg.to_string(), missing_field: None, at: None }
    }

    fn missing_field(field: &'static str) -> Self {
        Error { message: format!("missing field `{field}`"), missing_field: Some(field), at: None }
    }
}

/// Runs `T::deserialize` over the document until it succeeds, leaving out one refused node per run.
pub(super) fn deserialize_recovering<T: DeserializeOwned>(doc: &Document) -> (Option<T>, Vec<ConfigIssue>) {
    let mut left_out: HashSet<usize> = HashSet::new();
    let mut issues = Vec::new();
    loop {
        let result = T::deserialize(NodeDe { node: &doc.root, left_out: &left_out });
        let e = match result {
            Ok(value) => return (Some(value), issues),
            Err(e) => e.or_at(&doc.root),
        };
        let Some(at) = e.at.clone() else { return (None, issues) };
        let echo = e.missing_field.is_some_and(|field| refused_field(doc, at.node, field, &left_out));
        if !echo {
            issues.push(ConfigIssue {
                file: doc.file.clone(),
                line: at.pos.line,
                column: at.pos.column,
                path: at.path.clone(),
                message: e.message,
            });
        }
        // The root cannot be left out; nor can a node twice (no progress would be made).
        if at.node == doc.root.id || !left_out.insert(at.node) {
            return (None, issues);
        }
    }
}

/// True when the mapping `node` had `field` written, but its value was left out as refused.
fn refused_field(doc: &Document, node: usize, field: &str, left_out: &HashSet<usize>) -> bool {
    fn find(n: &Node, id: usize) -> Option<&Node> {
        if n.id == id {
            return Some(n);
        }
        match &n.kind {
            Kind::Scalar { .. } => None,
            Kind::Seq(items) => items.iter().find_map(|i| find(i, id)),
            Kind::Map(entries) => entries.iter().find_map(|e| find(&e.value, id)),
        }
    }
    match find(&doc.root, node).map(|n| &n.kind) {
        Some(Kind::Map(entries)) => entries.iter().any(|e| e.key == field && left_out.contains(&e.value.id)),
        _ => false,
    }
}

struct NodeDe<'a> {
    node: &'a Node,
    left_out: &'a HashSet<usize>,
}

impl<'a> NodeDe<'a> {
    fn scalar_text(&self) -> Option<&'a str> {
        match &self.node.kind {
            Kind::Scalar { value: Scalar::Null, .. } => None,
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self.node.kind, Kind::Scalar { value: Scalar::Null, .. })
    }

    fn seq(&self) -> SeqDe<'a> {
        let items: &'a [Node] = match &self.node.kind {
            Kind::Seq(items) => items,
            _ => &[],
        };
        SeqDe { items: items.iter(), left_out: self.left_out }
    }

    fn map(&self) -> MapDe<'a> {
        let entries: &'a [Entry] = match &self.node.kind {
            Kind::Map(entries) => entries,
            _ => &[],
        };
        MapDe { parent: self.node, entries: entries.iter(), value: None, left_out: self.left_out }
    }
}

impl<'de, 'a> de::Deserializer<'de> for NodeDe<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let node = self.node;
        let result = match &node.kind {
            Kind::Scalar { value, .. } => match value {
                Scalar::Null => visitor.visit_unit(),
                Scalar::Bool(b) => visitor.visit_bool(*b),
                Scalar::Int(i) => visitor.visit_i64(*i),
                Scalar::Uint(u) => visitor.visit_u64(*u),
                Scalar::Float(f) => visitor.visit_f64(*f),
                Scalar::Str(s) => visitor.visit_str(s),
            },
            Kind::Seq(_) => visitor.visit_seq(self.seq()),
            Kind::Map(_) => visitor.visit_map(self.map()),
        };
        result.map_err(|e| e.or_at(node))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let node = self.node;
        if self.is_null() { visitor.visit_none() } else { visitor.visit_some(self) }
            .map_err(|e| e.or_at(node))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let node = self.node;
        match self.scalar_text() {
            Some(text) => visitor.visit_str(text).map_err(|e: Error| e.or_at(node)),
            None => self.deserialize_any(visitor),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let node = self.node;
        if self.is_null() {
            visitor.visit_unit().map_err(|e: Error| e.or_at(node))
        } else {
            self.deserialize_any(visitor)
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        let node = self.node;
        visitor.visit_newtype_struct(self).map_err(|e| e.or_at(node))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let node = self.node;
        // An empty value (`exclude:`) reads as an empty list.
        if matches!(node.kind, Kind::Seq(_)) || self.is_null() {
            visitor.visit_seq(self.seq()).map_err(|e| e.or_at(node))
        } else {
            self.deserialize_any(visitor)
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let node = self.node;
        // An empty value (`healer:`) reads as an empty mapping.
        if matches!(node.kind, Kind::Map(_)) || self.is_null() {
            visitor.visit_map(self.map()).map_err(|e| e.or_at(node))
        } else {
            self.deserialize_any(visitor)
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // serde's derived structs would also take a list of their fields in order; a config never means that.
        if let Kind::Seq(_) = self.node.kind {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &visitor))
                .map_err(|e: Error| e.or_at(self.node));
        }
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let node = self.node;
        let result = match &node.kind {
            // `start: on_demand` (as written: YAML 1.1 would read `off` as a boolean)
            Kind::Scalar { value, text } if *value != Scalar::Null => {
                visitor.visit_enum(text.as_str().into_deserializer())
            }
            // `readiness: { http: /healthz }`: one key, the variant, and its value.
            Kind::Map(entries) if entries.len() == 1 => {
                visitor.visit_enum(EnumDe { entry: &entries[0], parent: node, left_out: self.left_out })
            }
            _ => Err(de::Error::custom("expected a variant name, or a mapping with exactly one key")),
        };
        result.map_err(|e| e.or_at(node))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 bytes byte_buf identifier
    }
}

struct SeqDe<'a> {
    items: std::slice::Iter<'a, Node>,
    left_out: &'a HashSet<usize>,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        let Some(item) = self.items.by_ref().find(|i| !self.left_out.contains(&i.id)) else {
            return Ok(None);
        };
        seed.deserialize(NodeDe { node: item, left_out: self.left_out }).map(Some).map_err(|e| e.or_at(item))
    }
}

struct MapDe<'a> {
    parent: &'a Node,
    entries: std::slice::Iter<'a, Entry>,
    value: Option<&'a Node>,
    left_out: &'a HashSet<usize>,
}

impl<'de> de::MapAccess<'de> for MapDe<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some(entry) = self.entries.by_ref().find(|e| !self.left_out.contains(&e.value.id)) else {
            return Ok(None);
        };
        self.value = Some(&entry.value);
        seed.deserialize(entry.key.as_str().into_deserializer())
            .map(Some)
            .map_err(|e: Error| e.or_at_key(entry, self.parent))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let node = self.value.take().ok_or_else(|| de::Error::custom("a value without its key"))?;
        seed.deserialize(NodeDe { node, left_out: self.left_out }).map_err(|e| e.or_at(node))
    }
}

struct EnumDe<'a> {
    entry: &'a Entry,
    parent: &'a Node,
    left_out: &'a HashSet<usize>,
}

impl<'de, 'a> de::EnumAccess<'de> for EnumDe<'a> {
    type Error = Error;
    type Variant = NodeDe<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, NodeDe<'a>), Error> {
        // An unknown variant leaves out the whole value: there is nothing to read without it.
        let variant = seed.deserialize(self.entry.key.as_str().into_deserializer()).map_err(|e: Error| {
            let mut e = e.or_at_key(self.entry, self.parent);
            if let Some(at) = &mut e.at {
                at.node = self.parent.id;
            }
            e
        })?;
        Ok((variant, NodeDe { node: &self.entry.value, left_out: self.left_out }))
    }
}

impl<'de> de::VariantAccess<'de> for NodeDe<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        if self.is_null() {
            Ok(())
        } else {
            Err(de::Error::custom("this variant takes no value")).map_err(|e: Error| e.or_at(self.node))
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        let node = self.node;
        seed.deserialize(self).map_err(|e| e.or_at(node))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_map(self, visitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        count: u16,
        name: String,
        tags: Vec<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Item {
        id: String,
        #[serde(default)]
        port: u16,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Check {
        Http(String),
        Tcp(bool),
        Off,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Top {
        inner: Inner,
        items: Vec<Item>,
        env: BTreeMap<String, String>,
        check: Option<Check>,
        other: Option<Check>,
    }

    fn run(text: &str) -> (Option<Top>, Vec<String>) {
        let doc = Document::parse(text, "t.yaml").unwrap();
        let (value, issues) = doc.deserialize::<Top>();
        (value, issues.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn reads_every_shape() {
        let (top, issues) =
            run("inner: { count: 3, name: 7, tags: [a, 2] }\nitems:\n  - { id: x, port: 80 }\n\
                                 env: { A: 1, B: yes }\ncheck: { http: /h }\nother: off\n");
        assert_eq!(issues, Vec::<String>::new());
        let top = top.unwrap();
        assert_eq!(top.inner, Inner { count: 3, name: "7".into(), tags: vec!["a".into(), "2".into()] });
        assert_eq!(top.items, vec![Item { id: "x".into(), port: 80 }]);
        assert_eq!(top.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(top.check, Some(Check::Http("/h".into())));
        assert_eq!(top.other, Some(Check::Off));
    }

    #[test]
    fn goes_on_past_every_refused_value() {
        let text = "\
inner:
  count: 70000
  nme: x
items:
  - { id: a, port: -1 }
  - { port: 2 }
  - { id: c, port: 3 }
check: { grpc: 1 }
";
        let (top, issues) = run(text);
        assert_eq!(
            issues,
            vec![
                "t.yaml:2:10: inner.count: invalid value: integer `70000`, expected u16",
                "t.yaml:3:3: inner.nme: unknown field `nme`, expected one of `count`, `name`, `tags`",
                "t.yaml:5:20: items[0].port: invalid value: integer `-1`, expected u16",
                "t.yaml:6:5: items[1]: missing field `id`",
                "t.yaml:8:10: check.grpc: unknown variant `grpc`, expected one of `http`, `tcp`, `off`",
            ]
        );
        let top = top.unwrap();
        // What was refused is left out; the rest is read.
        assert_eq!(top.inner.count, 0);
        assert_eq!(top.items, vec![Item { id: "a".into(), port: 0 }, Item { id: "c".into(), port: 3 }]);
        assert_eq!(top.check, None);
    }

    #[test]
    fn a_refused_required_value_is_reported_once() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Need {
            port: u16,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Wrap {
            list: Vec<Need>,
        }
        let doc = Document::parse("list:\n  - port: x\n  - port: 2\n", "t.yaml").unwrap();
        let (value, issues) = doc.deserialize::<Wrap>();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].path, "list[0].port");
        assert_eq!((issues[0].line, issues[0].column), (2, 11));
        assert_eq!(value.map(|w| w.list.len()), Some(1));
    }

    #[test]
    fn a_wrong_document_shape_is_one_issue() {
        let (top, issues) = run("- a\n- b\n");
        assert_eq!(top, None);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].starts_with("t.yaml:1:1: invalid type: sequence"), "{issues:?}");
    }
}
