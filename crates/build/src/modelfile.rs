//! The Modelfile: a Dockerfile-like list of directives naming the model's metadata and which
//! files are weights, weight configs, code, docs and data sets.
//!
//! ```text
//! # comment
//! NAME llama3-8b
//! PARAMSIZE 8b
//! CONFIG config.json "tokenizer*.json"
//! MODEL *.safetensors
//! DOC README.md
//! CODE src/**/*.py \
//!      scripts
//! ```
//!
//! Directives are case-insensitive; arguments are separated by blanks and may be double-quoted
//! (with `\"` and `\\` escapes); a trailing `\` continues the line; unknown directives and a
//! repeated single-valued directive are errors.

use std::fmt::Write as _;

use modelpack_spec::LayerKind;

use crate::error::{Error, Result};

/// Model metadata a Modelfile or the command line can set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// `NAME` -> `descriptor.name`.
    pub name: Option<String>,
    /// `ARCH` -> `config.architecture`.
    pub arch: Option<String>,
    /// `FAMILY` -> `descriptor.family`.
    pub family: Option<String>,
    /// `FORMAT` -> `config.format`.
    pub format: Option<String>,
    /// `PARAMSIZE` -> `config.paramSize`.
    pub param_size: Option<String>,
    /// `PRECISION` -> `config.precision`.
    pub precision: Option<String>,
    /// `QUANTIZATION` -> `config.quantization`.
    pub quantization: Option<String>,
}

impl Metadata {
    /// Fills every field `self` lacks from `other`.
    pub fn or(self, other: Metadata) -> Metadata {
        Metadata {
            name: self.name.or(other.name),
            arch: self.arch.or(other.arch),
            family: self.family.or(other.family),
            format: self.format.or(other.format),
            param_size: self.param_size.or(other.param_size),
            precision: self.precision.or(other.precision),
            quantization: self.quantization.or(other.quantization),
        }
    }

    fn fields(&self) -> [(&'static str, &Option<String>); 7] {
        [
            ("NAME", &self.name),
            ("ARCH", &self.arch),
            ("FAMILY", &self.family),
            ("FORMAT", &self.format),
            ("PARAMSIZE", &self.param_size),
            ("PRECISION", &self.precision),
            ("QUANTIZATION", &self.quantization),
        ]
    }

    fn field_mut(&mut self, directive: &str) -> Option<&mut Option<String>> {
        Some(match directive {
            "NAME" => &mut self.name,
            "ARCH" => &mut self.arch,
            "FAMILY" => &mut self.family,
            "FORMAT" => &mut self.format,
            "PARAMSIZE" => &mut self.param_size,
            "PRECISION" => &mut self.precision,
            "QUANTIZATION" => &mut self.quantization,
            _ => return None,
        })
    }
}

/// One file-selecting directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// The kind of layer the matched files become.
    pub kind: LayerKind,
    /// A glob (`*`, `?`, `[...]`, `**`) or a path, relative to the build context.
    pub pattern: String,
    /// Line it came from, for error messages.
    pub line: usize,
}

/// A parsed Modelfile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Modelfile {
    /// Metadata directives.
    pub metadata: Metadata,
    /// File directives in file order; the first one that matches a file decides its kind.
    pub selectors: Vec<Selector>,
}

fn kind_of(directive: &str) -> Option<LayerKind> {
    LayerKind::ALL
        .into_iter()
        .find(|k| k.directive() == directive)
}

/// Splits one logical line into words, honouring double quotes and backslash escapes.
fn words(text: &str, line: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some(e @ ('"' | '\\')) => word.push(e),
                        Some(other) => {
                            word.push('\\');
                            word.push(other);
                        }
                        None => break,
                    },
                    c => word.push(c),
                }
            }
            if !closed {
                return Err(Error::Modelfile {
                    line,
                    message: "unterminated quote".into(),
                });
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(Error::Modelfile {
                    line,
                    message: "text right after a closing quote".into(),
                });
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

fn quote(word: &str) -> String {
    if !word.is_empty()
        && !word.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c == '#')
    {
        word.to_owned()
    } else {
        format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

impl Modelfile {
    /// Parses Modelfile text.
    pub fn parse(text: &str) -> Result<Modelfile> {
        let mut modelfile = Modelfile::default();
        let mut logical = String::new();
        let mut start_line = 0;
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let trimmed = raw.trim();
            if logical.is_empty() {
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                start_line = line_no;
            } else if trimmed.starts_with('#') {
                continue;
            }
            if let Some(continued) = trimmed.strip_suffix('\\') {
                logical.push_str(continued);
                logical.push(' ');
                continue;
            }
            logical.push_str(trimmed);
            modelfile.directive(&logical, start_line)?;
            logical.clear();
        }
        if !logical.is_empty() {
            modelfile.directive(&logical, start_line)?;
        }
        Ok(modelfile)
    }

    fn directive(&mut self, logical: &str, line: usize) -> Result<()> {
        let mut parts = words(logical, line)?;
        if parts.is_empty() {
            return Ok(());
        }
        let directive = parts.remove(0).to_ascii_uppercase();
        if parts.is_empty() {
            return Err(Error::Modelfile {
                line,
                message: format!("{directive} needs an argument"),
            });
        }
        if let Some(kind) = kind_of(&directive) {
            for pattern in parts {
                self.selectors.push(Selector {
                    kind,
                    pattern,
                    line,
                });
            }
            return Ok(());
        }
        let Some(field) = self.metadata.field_mut(&directive) else {
            return Err(Error::Modelfile {
                line,
                message: format!("unknown directive {directive:?}"),
            });
        };
        if parts.len() != 1 {
            return Err(Error::Modelfile {
                line,
                message: format!("{directive} takes one value (quote it if it has spaces)"),
            });
        }
        if field.is_some() {
            return Err(Error::Modelfile {
                line,
                message: format!("{directive} given twice"),
            });
        }
        *field = parts.pop();
        Ok(())
    }

    /// The Modelfile as text that [`Modelfile::parse`] reads back to the same value.
    pub fn to_text(&self) -> String {
        let mut out = String::from(
            "# Generated by modelpack. Each file directive selects files by glob;\n# the first directive that matches a file decides its layer type.\n",
        );
        for (directive, value) in self.metadata.fields() {
            if let Some(value) = value {
                let _ = writeln!(out, "{directive} {}", quote(value));
            }
        }
        for kind in LayerKind::ALL {
            let selected: Vec<_> = self.selectors.iter().filter(|s| s.kind == kind).collect();
            if selected.is_empty() {
                continue;
            }
            out.push('\n');
            for s in selected {
                let _ = writeln!(out, "{} {}", kind.directive(), quote(&s.pattern));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directives() {
        let text = "# c\nNAME llama\nparamsize 8b\nCONFIG config.json \"tok enizer.json\"\nMODEL *.safetensors \\\n  extra/**/*.bin\n\nDATASET data\n";
        let m = Modelfile::parse(text).expect("parses");
        assert_eq!(m.metadata.name.as_deref(), Some("llama"));
        assert_eq!(m.metadata.param_size.as_deref(), Some("8b"));
        let got: Vec<_> = m
            .selectors
            .iter()
            .map(|s| (s.kind, s.pattern.as_str(), s.line))
            .collect();
        assert_eq!(
            got,
            [
                (LayerKind::WeightConfig, "config.json", 4),
                (LayerKind::WeightConfig, "tok enizer.json", 4),
                (LayerKind::Weight, "*.safetensors", 5),
                (LayerKind::Weight, "extra/**/*.bin", 5),
                (LayerKind::Dataset, "data", 8),
            ]
        );
        let again = Modelfile::parse(&m.to_text()).expect("round trip");
        assert_eq!(again.metadata, m.metadata);
        let kinds_and_patterns = |m: &Modelfile| {
            m.selectors
                .iter()
                .map(|s| (s.kind, s.pattern.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds_and_patterns(&again), kinds_and_patterns(&m));
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line, needle) in [
            ("NAME a\nFOO bar\n", 2, "unknown directive"),
            ("NAME a\nNAME b\n", 2, "given twice"),
            ("MODEL\n", 1, "needs an argument"),
            ("\n\nCODE \"x\n", 3, "unterminated"),
            ("NAME a b\n", 1, "takes one value"),
        ] {
            let err = Modelfile::parse(text).expect_err(text).to_string();
            assert!(err.contains(&format!("line {line}")), "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }
}
