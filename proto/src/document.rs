//! Policy documents: the YAML or JSON files `prism apply -f` reads. YAML is a
//! superset of JSON, so one parser serves both.

use std::collections::HashMap;

use crate::pb::config::v1::Policy;
use crate::resource::{Resource, ResourceKey};
use crate::validate::{ValidationError, validate_resource};

/// A policy document that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("the document is empty")]
    Empty,
    /// Not YAML/JSON, or not the shape of a `Policy` (unknown or mistyped field).
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Invalid(#[from] ValidationError),
}

/// Parses and checks a policy document, returning its resources in document
/// order (namespaces, backends, routes, secrets). Each resource is validated
/// on its own; errors name the field as `backends[1].endpoints[0].address`.
pub fn parse_policy(text: &str) -> Result<Vec<Resource>, DocumentError> {
    if text.trim().is_empty() {
        return Err(DocumentError::Empty);
    }
    let policy: Policy =
        serde_yaml::from_str(text).map_err(|e| DocumentError::Syntax(e.to_string()))?;
    let resources: Vec<(String, Resource)> = policy
        .namespaces
        .into_iter()
        .enumerate()
        .map(|(i, r)| (format!("namespaces[{i}]"), Resource::Namespace(r)))
        .chain(
            policy
                .backends
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("backends[{i}]"), Resource::Backend(r))),
        )
        .chain(
            policy
                .routes
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("routes[{i}]"), Resource::Route(r))),
        )
        .chain(
            policy
                .secrets
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("secrets[{i}]"), Resource::Secret(r))),
        )
        .chain(
            policy
                .bindings
                .into_iter()
                .enumerate()
                .map(|(i, r)| (format!("bindings[{i}]"), Resource::DataBinding(r))),
        )
        .collect();
    if resources.is_empty() {
        return Err(DocumentError::Empty);
    }
    // Where each key was first defined: one lookup a resource, so a
    // document of many resources costs what it holds, not its square.
    let mut defined: HashMap<ResourceKey, &str> = HashMap::with_capacity(resources.len());
    for (path, resource) in &resources {
        validate_resource(resource).map_err(|e| e.under(path))?;
        if let Some(first) = defined.insert(resource.key(), path) {
            return Err(ValidationError::new(
                format!("{path}.name"),
                format!("`{}` is also defined at {first}", resource.name()),
            )
            .into());
        }
    }
    Ok(resources.into_iter().map(|(_, r)| r).collect())
}

/// Renders resources as a policy document in YAML.
pub fn policy_to_yaml<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> String {
    let mut policy = Policy::default();
    for resource in resources {
        match resource {
            Resource::Secret(r) => policy.secrets.push(r.clone()),
            Resource::Namespace(r) => policy.namespaces.push(r.clone()),
            Resource::Backend(r) => policy.backends.push(r.clone()),
            Resource::Route(r) => policy.routes.push(r.clone()),
            Resource::DataBinding(r) => policy.bindings.push(r.clone()),
        }
    }
    // Serializing a generated message cannot fail (string keys, no floats).
    serde_yaml::to_string(&policy).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Kind;

    const QUICKSTART: &str = r#"
namespaces:
  - name: demo
    hosts: [demo.local]
    default_timeout: 15s
backends:
  - name: demo/upstream
    protocol: HTTP1
    endpoints:
      - address: 127.0.0.1:8081
routes:
  - name: demo/root
    match: { prefix: / }
    backend: upstream
    timeout: 2.5s
"#;

    #[test]
    fn reads_yaml_with_durations_and_enums() {
        let resources = parse_policy(QUICKSTART).expect("parses");
        assert_eq!(resources.len(), 3);
        assert_eq!(resources[1].kind(), Kind::Backend);
        let Resource::Route(route) = &resources[2] else {
            panic!("expected a route")
        };
        assert_eq!(
            route.timeout.map(|t| (t.seconds, t.nanos)),
            Some((2, 500_000_000))
        );
    }

    #[test]
    fn a_resource_defined_twice_is_named_with_its_first_place() {
        let err = parse_policy(
            "routes:\n  - {name: a/one, match: {prefix: /}, backend: b}\n  - {name: a/two, \
             match: {prefix: /}, backend: b}\n  - {name: a/one, match: {prefix: /x}, backend: b}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("routes[2].name"), "{err}");
        assert!(
            err.contains("`a/one` is also defined at routes[0]"),
            "{err}"
        );
    }

    #[test]
    fn reads_json_with_camel_case_names() {
        let json = r#"{"routes":[{"name":"a/r","match":{"host":"x.test","prefix":"/"},"backend":"b"}],
                       "backends":[{"name":"a/b","lbPolicy":"ROUND_ROBIN","endpoints":[{"address":"10.0.0.1:80"}]}]}"#;
        assert_eq!(parse_policy(json).expect("parses").len(), 2);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let err = parse_policy("routes:\n  - name: a/r\n    matches: {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("matches"), "{err}");
        let err = parse_policy("widgets: []\n").unwrap_err().to_string();
        assert!(err.contains("widgets"), "{err}");
        let err = parse_policy("backends:\n  - name: a/b\n    protocol: SMTP\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("SMTP"), "{err}");
        let err = parse_policy("backends:\n  - name: a/b\n    endpoints: [{address: nope}]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("backends[0].endpoints[0].address"), "{err}");
        let err = parse_policy("{").unwrap_err();
        assert!(matches!(err, DocumentError::Syntax(_)));
        assert!(matches!(parse_policy("  \n"), Err(DocumentError::Empty)));
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let doc = "namespaces:\n  - name: a\n  - name: a\n";
        assert!(
            parse_policy(doc)
                .unwrap_err()
                .to_string()
                .contains("namespaces[1].name")
        );
    }

    #[test]
    fn secrets_are_read_validated_and_written() {
        let cert = include_str!("../../tests/support/tls/server.pem");
        let key = include_str!("../../tests/support/tls/server.key");
        let indent = |pem: &str| pem.replace('\n', "\n          ");
        let doc = format!(
            "{QUICKSTART}secrets:\n  - name: demo/tls\n    tls_certificate:\n      \
             certificate_chain: |\n          {}\n      private_key: |\n          {}\n",
            indent(cert.trim_end()),
            indent(key.trim_end())
        );
        let resources = parse_policy(&doc).expect("parses");
        assert_eq!(resources.len(), 4);
        let Resource::Secret(secret) = &resources[3] else {
            panic!("expected a secret last, in document order")
        };
        assert_eq!(secret.name, "demo/tls");
        let again = parse_policy(&policy_to_yaml(&resources)).expect("re-parses");
        assert_eq!(again, resources);

        let err =
            parse_policy("secrets:\n  - name: demo/tls\n    ca_bundle: {certificates: nope}\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("secrets[0].ca_bundle.certificates"), "{err}");
    }

    #[test]
    fn yaml_round_trips() {
        let resources = parse_policy(QUICKSTART).expect("parses");
        let again = parse_policy(&policy_to_yaml(&resources)).expect("re-parses");
        assert_eq!(again, resources);
    }
}
