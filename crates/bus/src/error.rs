pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bus configuration: {0}")]
    Config(String),
    #[error("connecting to nats: {0}")]
    Connect(String),
    #[error("provisioning jetstream: {0}")]
    Provision(String),
    #[error("publishing: {0}")]
    Publish(String),
    #[error("subscribing: {0}")]
    Subscribe(String),
}

impl Error {
    /// Would the same call likely succeed if tried again later?
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Connect(_) | Error::Publish(_) | Error::Subscribe(_)
        )
    }
}
