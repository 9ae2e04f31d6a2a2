//! `sd-host models list | scan | add-civitai | delete`.

use crate::config::Config;

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// List the models in the library.
    List,
    /// Register files dropped into models.dir.
    Scan,
}

pub fn run(config: Config, cmd: ModelsCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        std::fs::create_dir_all(&config.data_dir)?;
        let repo = crate::db::connect(&config.database_url()).await?;
        match cmd {
            ModelsCommand::Scan => {
                let found = super::library::scan(&repo, &config.models_dir()).await?;
                println!("{} models", found.len());
            }
            ModelsCommand::List => {
                for m in repo.list_models(&Default::default()).await? {
                    println!(
                        "{}  {:<10} {:<6} {}",
                        m.sha256, m.model_type, m.family, m.filename
                    );
                }
            }
        }
        Ok(())
    })
}
