//! `agent-client check`: the preflight of a migration, without the migration.

use std::process::ExitCode;

use anyhow::Result;
use common::migration::phases::Survey;
use common::migration::preflight::Severity;
use common::migration::MigrationRequest;

use crate::output;
use crate::CommonArgs;

pub async fn run(args: &CommonArgs, request: &MigrationRequest) -> Result<ExitCode> {
    let survey = survey(args, request).await?;
    output::print_survey(&survey, args.json)?;
    Ok(if has_problems(&survey) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs the preflight with a spinner on stderr.
pub async fn survey(args: &CommonArgs, request: &MigrationRequest) -> Result<Survey> {
    let spinner = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    spinner.set_message(format!(
        "checking {} here and at {} ...",
        request.container, request.destination
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let survey = common::migration::check(request).await;
    spinner.finish_and_clear();
    survey
}

pub fn has_problems(survey: &Survey) -> bool {
    survey
        .findings
        .iter()
        .any(|f| f.severity == Severity::Problem)
}
