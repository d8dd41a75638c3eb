//! XDP benchmark: per-packet cost via BPF_PROG_TEST_RUN, and flood
//! resistance in a network-namespace test bed.

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the xdp benchmark is not written yet")
}
