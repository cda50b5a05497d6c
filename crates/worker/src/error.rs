pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] drover_store::Error),
    #[error(transparent)]
    Bus(#[from] drover_bus::Error),
    #[error("pulling jobs: {0}")]
    Consumer(String),
}
