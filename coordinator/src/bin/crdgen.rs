//! `crdgen`: prints the CustomResourceDefinitions of Berth's resources as YAML,
//! the source of `manifests/05-crds.yaml`.

fn main() {
    print!("{}", berth_coordinator::crd_yaml());
}
