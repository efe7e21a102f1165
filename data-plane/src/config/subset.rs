//! The namespace subset a proxy serves: `--namespaces a,b` and `--selector
//! env=prod`. The proxy only parses and reports it; the control plane filters
//! what the proxy's discovery stream receives.
//!
//! The subset travels in the xDS `Node.metadata` as two strings, in the same
//! syntax as the flags: `prism_namespaces` = `"a,b"` and `prism_selector` =
//! `"env=prod,tier=web"`. An absent or empty field means "no restriction".

use std::collections::BTreeMap;

/// Node metadata key of the namespace list.
pub(crate) const NAMESPACES_KEY: &str = "prism_namespaces";
/// Node metadata key of the label selector.
pub(crate) const SELECTOR_KEY: &str = "prism_selector";

/// Why a namespace list or a label selector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubsetError {
    /// One entry of `--namespaces` is not a namespace name.
    #[error(
        "namespaces: `{name}` is not a namespace name (lowercase letters, digits and '-', 1 to 63 characters, not starting or ending with '-')"
    )]
    Namespace { name: String },
    /// One entry of `--selector` is not `key=value`.
    #[error("selector: `{pair}` is not key=value (expected e.g. env=prod,tier=web)")]
    Pair { pair: String },
    /// A label key is empty, too long, or holds a separator.
    #[error(
        "selector: label key `{key}` must be 1 to 63 characters without ',', '=' or whitespace"
    )]
    Key { key: String },
    /// A label value holds a separator.
    #[error("selector: the value of `{key}` must not contain ',', '=' or whitespace")]
    Value { key: String },
    /// The same key is given twice with different values.
    #[error("selector: label `{key}` is given twice with different values")]
    Duplicate { key: String },
}

/// Parses `--namespaces`: names separated by commas, e.g. `a,b`. Surrounding
/// whitespace and empty entries (`a,,b`, a trailing comma) are ignored, and
/// the result is sorted and without duplicates. An empty string means "every
/// namespace".
pub fn parse_namespaces(text: &str) -> Result<Vec<String>, SubsetError> {
    let mut names = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        check_namespace(name)?;
        names.push(name.to_string());
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Parses `--selector`: `key=value` pairs separated by commas, e.g.
/// `env=prod,tier=web`. A namespace is served when every pair matches one of
/// its labels. An empty string selects every namespace.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, SubsetError> {
    let mut selector = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(SubsetError::Pair {
                pair: pair.to_string(),
            });
        };
        let (key, value) = (key.trim(), value.trim());
        check_label(key, value)?;
        match selector.insert(key.to_string(), value.to_string()) {
            Some(old) if old != value => {
                return Err(SubsetError::Duplicate {
                    key: key.to_string(),
                });
            }
            _ => {}
        }
    }
    Ok(selector)
}

/// Checks a subset given as `Config` fields (which need not come from the
/// parsers above): every entry must survive the trip through the metadata
/// strings unchanged.
pub(crate) fn check(
    namespaces: &[String],
    selector: &BTreeMap<String, String>,
) -> Result<(), SubsetError> {
    for name in namespaces {
        check_namespace(name)?;
    }
    for (key, value) in selector {
        check_label(key, value)?;
    }
    Ok(())
}

/// `prism_namespaces`: the names joined by commas, sorted, e.g. `a,b`.
pub(crate) fn namespaces_metadata(namespaces: &[String]) -> String {
    let mut names: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    names.join(",")
}

/// `prism_selector`: `key=value` pairs joined by commas, sorted by key.
pub(crate) fn selector_metadata(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One string naming the whole subset, stored beside the last-known-good
/// snapshot so a proxy restarted with another subset does not serve it.
pub(crate) fn describe(namespaces: &[String], selector: &BTreeMap<String, String>) -> String {
    format!(
        "namespaces={};selector={}",
        namespaces_metadata(namespaces),
        selector_metadata(selector)
    )
}

/// The rule of Namespace names (a DNS label), as prism-proto validates them.
fn check_namespace(name: &str) -> Result<(), SubsetError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(SubsetError::Namespace {
            name: name.to_string(),
        })
    }
}

fn check_label(key: &str, value: &str) -> Result<(), SubsetError> {
    let separator = |c: char| c == ',' || c == '=' || c.is_whitespace();
    if key.is_empty() || key.len() > 63 || key.contains(separator) {
        return Err(SubsetError::Key {
            key: key.to_string(),
        });
    }
    if value.contains(separator) {
        return Err(SubsetError::Value {
            key: key.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_trimmed_sorted_and_deduplicated() {
        assert_eq!(parse_namespaces(""), Ok(vec![]));
        assert_eq!(
            parse_namespaces("b, a,,b,"),
            Ok(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            parse_namespaces("a,B_x"),
            Err(SubsetError::Namespace { name: "B_x".into() })
        );
        assert_eq!(namespaces_metadata(&["b".into(), "a".into()]), "a,b");
    }

    #[test]
    fn selector_pairs_must_be_key_value() {
        let selector = parse_selector("tier=web, env=prod").expect("valid");
        assert_eq!(selector_metadata(&selector), "env=prod,tier=web");
        assert_eq!(parse_selector(""), Ok(BTreeMap::new()));
        assert_eq!(
            parse_selector("env=").map(|s| s["env"].clone()),
            Ok("".into())
        );

        let error = parse_selector("foo").expect_err("no =");
        assert_eq!(error, SubsetError::Pair { pair: "foo".into() });
        assert_eq!(
            error.to_string(),
            "selector: `foo` is not key=value (expected e.g. env=prod,tier=web)"
        );
        assert_eq!(
            parse_selector("=prod"),
            Err(SubsetError::Key { key: String::new() })
        );
        assert_eq!(
            parse_selector("env=a=b"),
            Err(SubsetError::Value { key: "env".into() })
        );
        assert_eq!(
            parse_selector("env=a,env=b"),
            Err(SubsetError::Duplicate { key: "env".into() })
        );
        assert!(parse_selector("env=a,env=a").is_ok());
    }

    #[test]
    fn config_fields_are_checked_like_flags() {
        let mut selector = BTreeMap::new();
        assert!(check(&["a".into()], &selector).is_ok());
        assert!(check(&["a,b".into()], &selector).is_err());
        selector.insert("env".into(), "prod,dev".into());
        assert!(check(&[], &selector).is_err());
        assert_eq!(describe(&[], &BTreeMap::new()), "namespaces=;selector=");
    }
}
