//! HTTP benchmark: wrk against the backend directly, through the gateway and
//! through nginx.

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the http benchmark is not written yet")
}
