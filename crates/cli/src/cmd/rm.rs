//! `modelpack rm`: remove names from the store.

use std::process::ExitCode;

use crate::args::{GlobalArgs, RmArgs};

pub fn run(global: &GlobalArgs, args: RmArgs) -> anyhow::Result<ExitCode> {
    let store = super::open_store(global)?;
    // Parse everything first, so a typo removes nothing.
    let references = args
        .references
        .iter()
        .map(|r| super::parse_reference(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for reference in references {
        for removed in store.untag(&reference)? {
            if !global.quiet {
                println!("Removed {} ({})", reference.familiar(), removed.digest());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
