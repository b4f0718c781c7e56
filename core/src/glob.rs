//! Shell-style globs for selectors (rule `select:`, notification `match:`): `*` (any run), `?` (one
//! character), `[abc]`, `[a-z]`, `[!0-9]`.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyOne,
    AnyRun,
    Class { negated: bool, ranges: Vec<(char, char)> },
}

/// A compiled glob; matches a whole string.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    tokens: Vec<Token>,
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.text)
    }
}

impl Glob {
    /// Compiles `text`; the error says what is wrong with it.
    pub fn new(text: &str) -> Result<Glob, String> {
        if text.is_empty() {
            return Err("an empty glob matches nothing; write `*` for everything".into());
        }
        let mut tokens = Vec::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' => Token::AnyRun,
                '?' => Token::AnyOne,
                '[' => {
                    let mut negated = false;
                    let mut ranges = Vec::new();
                    let mut closed = false;
                    let mut first = true;
                    let mut pending: Option<char> = None;
                    while let Some(c) = chars.next() {
                        match c {
                            '!' if first => negated = true,
                            ']' if !ranges.is_empty() || pending.is_some() => {
                                closed = true;
                                break;
                            }
                            '-' if pending.is_some() => {
                                let lo = pending.take().unwrap_or('-');
                                let hi =
                                    chars.next().ok_or_else(|| format!("unclosed `[` in glob `{text}`"))?;
                                if hi == ']' {
                                    return Err(format!("range without an end in glob `{text}`"));
                                }
                                if hi < lo {
                                    return Err(format!("range `{lo}-{hi}` is backwards in glob `{text}`"));
                                }
                                ranges.push((lo, hi));
                            }
                            c => {
                                if let Some(p) = pending.replace(c) {
                                    ranges.push((p, p));
                                }
                            }
                        }
                        first = false;
                    }
                    if let Some(p) = pending {
                        ranges.push((p, p));
                    }
                    if !closed {
                        return Err(format!("unclosed `[` in glob `{text}`"));
                    }
                    Token::Class { negated, ranges }
                }
                ']' => return Err(format!("unopened `]` in glob `{text}`")),
                c => Token::Literal(c),
            });
        }
        Ok(Glob { text: text.to_string(), tokens })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, s: &str) -> bool {
        let chars: Vec<char> = s.chars().collect();
        // Classic two-pointer match with backtracking to the last `*`: linear in practice, never exponential.
        let (mut t, mut i) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while i < chars.len() {
            let step = match self.tokens.get(t) {
                Some(Token::AnyRun) => {
                    star = Some((t, i));
                    t += 1;
                    continue;
                }
                Some(Token::AnyOne) => true,
                Some(Token::Literal(c)) => *c == chars[i],
                Some(Token::Class { negated, ranges }) => {
                    ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&chars[i])) != *negated
                }
                None => false,
            };
            if step {
                t += 1;
                i += 1;
            } else if let Some((st, si)) = star {
                t = st + 1;
                i = si + 1;
                star = Some((st, si + 1));
            } else {
                return false;
            }
        }
        self.tokens[t..].iter().all(|tok| *tok == Token::AnyRun)
    }
}

/// A glob in a configuration file is compiled as it is read, so a bad one is reported at its position.
impl<'de> serde::Deserialize<'de> for Glob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Glob, D::Error> {
        let text = String::deserialize(d)?;
        Glob::new(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(g: &str, s: &str) -> bool {
        Glob::new(g).unwrap().matches(s)
    }

    #[test]
    fn matching() {
        assert!(m("*", ""));
        assert!(m("*", "echo"));
        assert!(m("echo", "echo"));
        assert!(!m("echo", "echo2"));
        assert!(m("echo-*", "echo-0"));
        assert!(m("*-0", "echo-0"));
        assert!(m("e*o*0", "echo-0"));
        assert!(m("echo-?", "echo-7"));
        assert!(!m("echo-?", "echo-17"));
        assert!(m("echo-[0-3]", "echo-2"));
        assert!(!m("echo-[0-3]", "echo-5"));
        assert!(m("echo-[!0-3]", "echo-5"));
        assert!(m("[ab]x", "bx"));
        assert!(m("cg:/system.slice/*", "cg:/system.slice/nginx.service"));
    }

    #[test]
    fn mistakes() {
        assert_eq!(Glob::new("echo-[0-9").unwrap_err(), "unclosed `[` in glob `echo-[0-9`");
        assert_eq!(Glob::new("a]").unwrap_err(), "unopened `]` in glob `a]`");
        assert_eq!(Glob::new("[9-0]").unwrap_err(), "range `9-0` is backwards in glob `[9-0]`");
        assert!(Glob::new("").is_err());
    }
}
