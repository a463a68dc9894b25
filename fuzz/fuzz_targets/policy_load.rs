//! Feeds arbitrary text to policy loading and validation (`Compiled::from_yaml`: the bounds
//! pass, serde_yaml, typed parsing, cross-object validation, compilation), then to the kernel
//! plan and the JSON dump of whatever compiled. Checks that nothing panics or runs away, and
//! that every error names its source document and has a one-line reason. Seeds: the example
//! policies in manifests/examples and the test policies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_policy::{Compiled, NodeSettings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Compiled::from_yaml(text, "fuzz.yaml") {
        Ok(policy) => {
            let _ = policy.kernel_plan(&NodeSettings::default());
            let _ = policy.to_json();
            let _ = policy.summary();
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for error in &errors {
                assert!(
                    error.source.starts_with("fuzz.yaml#") || error.source.is_empty(),
                    "{error:?}"
                );
                let line = error.to_string();
                assert!(!line.contains('\n'), "{line:?}");
            }
        }
    }
});
