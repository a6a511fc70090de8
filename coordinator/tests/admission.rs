//! The ImageCache CRD's admission rules, evaluated as the apiserver would
//! (CEL through `kube-cel`) on the CRD that `crdgen` prints: what admission
//! lets through is what the coordinator can use, and the other way round.
//!
//! Schema keywords other than CEL rules (`enum`, `maxLength`, `minItems`) are
//! the apiserver's own and are checked by the e2e admission test.

use berth_coordinator::imagecache::crd::ImageCache;
use berth_coordinator::imagecache::view::parse_duration;
use berth_proto::reference::{Reference, examples};
use kube::CustomResourceExt;
use serde_json::{Value, json};
use std::time::Duration;

fn schema() -> Value {
    let crd = serde_json::to_value(ImageCache::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The messages of the rules `spec` breaks; empty when admitted.
fn refusals(spec: Value) -> Vec<String> {
    let object = json!({
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ImageCache",
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": spec,
    });
    match kube_cel::validate(&schema(), &object, None) {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.message.clone()).collect(),
    }
}

fn image(reference: &str) -> Value {
    json!({"images": [{"ref": reference}]})
}

#[test]
fn admission_accepts_exactly_the_references_the_parser_accepts() {
    for e in examples() {
        let refused = refusals(image(&e.input));
        match e.expected {
            Ok(_) => assert!(refused.is_empty(), "{:?} refused: {refused:?}", e.input),
            Err(why) => {
                assert!(!refused.is_empty(), "{:?} admitted ({why})", e.input);
                let expected = if why.contains("once normalised") {
                    "at most 255 characters once normalised"
                } else {
                    "ref must be an image reference"
                };
                assert!(
                    refused.iter().all(|m| m.contains(expected)),
                    "{:?}: {refused:?}",
                    e.input
                );
            }
        }
    }
}

#[test]
fn the_reference_schema_is_long_enough_for_the_longest_valid_reference() {
    let max = &schema()["properties"]["spec"]["properties"]["images"]["items"]["properties"]["ref"]
        ["maxLength"];
    assert_eq!(
        max.as_u64(),
        Some(berth_proto::reference::REFERENCE_MAX as u64)
    );
}

#[test]
fn track_tag_refuses_an_image_pinned_by_digest() {
    let d = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let with = |policy: &str, reference: &str| json!({"images": [{"ref": "r.io/b:1"}, {"ref": reference}], "updatePolicy": {"type": policy}});
    let refused = refusals(with("TrackTag", &format!("r.io/a:1@{d}")));
    assert!(
        refused.len() == 1 && refused[0].contains("TrackTag follows tags"),
        "{refused:?}"
    );
    assert_eq!(refusals(with("TrackTag", "r.io/a:1")), Vec::<String>::new());
    assert_eq!(
        refusals(with("Pinned", &format!("r.io/a@{d}"))),
        Vec::<String>::new()
    );
    assert_eq!(
        refusals(json!({"images": [{"ref": format!("r.io/a@{d}")}]})),
        Vec::<String>::new()
    );
}

#[test]
fn node_names_and_pull_secret_names_must_be_dns_subdomains() {
    let ok = json!({"images": [{"ref": "a"}], "nodeNames": ["node-1", "ip-10-0-0-1.ec2.internal"],
        "imagePullSecrets": [{"name": "regcred"}]});
    assert_eq!(refusals(ok), Vec::<String>::new());
    for bad in [
        "../../kube-system/x",
        "Node-1",
        "node_1",
        "",
        "-node",
        "node.",
    ] {
        let refused = refusals(json!({"images": [{"ref": "a"}], "nodeNames": [bad]}));
        assert!(
            refused.len() == 1 && refused[0].contains("nodeNames must be node names"),
            "{bad:?}: {refused:?}"
        );
        let refused =
            refusals(json!({"images": [{"ref": "a"}], "imagePullSecrets": [{"name": bad}]}));
        assert!(
            refused.len() == 1
                && refused[0].contains("imagePullSecrets name must be a Secret name"),
            "{bad:?}: {refused:?}"
        );
    }
}

fn selector(s: Value) -> Vec<String> {
    refusals(json!({"images": [{"ref": "a"}], "nodeSelector": s}))
}

#[test]
fn a_usable_node_selector_is_admitted() {
    let s = json!({
        "matchLabels": {"pool": "gpu", "example.com/zone": "eu-1a", "empty": ""},
        "matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]},
            {"key": "tier", "operator": "NotIn", "values": ["batch"]},
            {"key": "gpu", "operator": "Exists"},
            {"key": "spot", "operator": "DoesNotExist", "values": []},
        ],
    });
    assert_eq!(selector(s), Vec::<String>::new());
}

#[test]
fn in_and_not_in_need_values_and_exists_takes_none() {
    for (op, values) in [
        ("In", None),
        ("NotIn", Some(json!([]))),
        ("Exists", Some(json!(["x"]))),
        ("DoesNotExist", Some(json!(["x"]))),
    ] {
        let mut e = json!({"key": "k", "operator": op});
        if let Some(v) = values {
            e["values"] = v;
        }
        let refused = selector(json!({"matchExpressions": [e]}));
        assert!(
            refused.len() == 1 && refused[0].contains("In and NotIn need values"),
            "{op}: {refused:?}"
        );
    }
}

#[test]
fn selector_keys_and_values_must_be_label_keys_and_values() {
    let long_prefix = format!("{}/k", "a".repeat(254));
    for (key, why) in [
        ("bad key", "must be a label key"),
        ("-k", "must be a label key"),
        ("Example.com/k", "must be a label key"),
        (&format!("k{}", "x".repeat(63)), "must be a label key"),
        (&long_prefix, "prefix must be at most 253"),
    ] {
        let refused = selector(json!({"matchExpressions": [{"key": key, "operator": "Exists"}]}));
        assert!(
            refused.len() == 1 && refused[0].contains(why),
            "{key:?}: {refused:?}"
        );
    }
    for value in ["-x", "a b", "x_"] {
        let refused = selector(json!({"matchLabels": {"k": value}}));
        assert!(
            refused.len() == 1 && refused[0].contains("matchLabels values must be label values"),
            "{value:?}: {refused:?}"
        );
        let refused = selector(
            json!({"matchExpressions": [{"key": "k", "operator": "In", "values": [value]}]}),
        );
        assert!(
            refused.len() == 1
                && refused[0].contains("matchExpressions values must be label values"),
            "{value:?}: {refused:?}"
        );
    }
}

#[test]
fn admission_and_the_controller_read_durations_alike() {
    for (value, seconds) in [
        ("90s", Some(90)),
        ("10m", Some(600)),
        ("1h30m", Some(5400)),
        ("1.5h", Some(5400)),
        ("24h", Some(86400)),
        ("1s", Some(1)),
        ("forever", None),
        ("5 minutes", None),
        ("1d", None),
        ("10", None),
    ] {
        let refused = refusals(json!({"images": [{"ref": "a", "pullTimeout": value}]}));
        let read = parse_duration(value).ok();
        assert_eq!(read, seconds.map(Duration::from_secs), "{value:?}");
        assert_eq!(refused.is_empty(), read.is_some(), "{value:?}: {refused:?}");
    }
}

#[test]
fn every_rule_compiles_and_stays_within_the_cost_budget() {
    fn walk(node: &Value, path: &str, rules: &mut usize) {
        if let Some(list) = node["x-kubernetes-validations"].as_array() {
            let compiled = kube_cel::compile_schema(node);
            assert!(
                !compiled.has_errors(),
                "{path}: {:?}",
                compiled.compilation_errors()
            );
            for r in list {
                let rule = r["rule"].as_str().unwrap();
                let warnings = kube_cel::estimate_rule_cost(rule, &compiled);
                assert!(warnings.is_empty(), "{path}: {rule}: {warnings:?}");
                *rules += 1;
            }
        }
        for (k, child) in node["properties"].as_object().into_iter().flatten() {
            walk(child, &format!("{path}.{k}"), rules);
        }
        walk_opt(&node["items"], &format!("{path}[]"), rules);
        walk_opt(&node["additionalProperties"], &format!("{path}{{}}"), rules);
    }
    fn walk_opt(node: &Value, path: &str, rules: &mut usize) {
        if node.is_object() {
            walk(node, path, rules);
        }
    }
    let mut rules = 0;
    walk(&schema(), "", &mut rules);
    assert!(rules >= 12, "only {rules} rules found");
}

#[test]
fn references_that_normalise_alike_pass_admission_but_the_controller_reports_them() {
    // CEL cannot normalise; `view::cache_view` reports these as InvalidSpec.
    let spec = json!({"images": [{"ref": "busybox"}, {"ref": "docker.io/library/busybox:latest"}]});
    assert_eq!(refusals(spec), Vec::<String>::new());
    assert_eq!(
        Reference::parse("busybox").unwrap(),
        Reference::parse("docker.io/library/busybox:latest").unwrap()
    );
}
