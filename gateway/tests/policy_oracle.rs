//! The policy compiler against an independent oracle: random cluster-set policies (tied
//! priorities, nested and overlapping prefixes, clusters that never joined, port ranges that
//! overlap, probe addresses) compiled to the kernel's tables, and random packets decided by
//! the tables' lookup (`evaluate`, the mirror of the TC program) and by the oracle (the rules
//! read one by one). They must agree on the verdict and on the deciding rule.
//! `policy_datapath.rs` replays a sample through the kernel program itself.

#[path = "support/policy_oracle.rs"]
mod oracle;

use causeway_gateway::policy::{PolicyError, compile, evaluate};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn compiled_tables_decide_as_the_rules_read_in_order(
        (input, packets) in oracle::policy().prop_flat_map(|input| {
            let packets = oracle::packets(&input, 64);
            (Just(input), packets)
        })
    ) {
        let compiled = match compile(&input) {
            Ok(c) => c,
            Err(PolicyError::TooLarge { .. }) => return Err(TestCaseError::reject("too large for the kernel")),
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        for (src, dst, proto, port) in packets {
            let tables = evaluate(&compiled.tables, src, dst, proto, port);
            let expected = oracle::decide(&input, src, dst, proto, port);
            prop_assert_eq!(tables, expected, "{} → {} proto {} port {}", src, dst, proto, port);
        }
    }
}
