//! How policy arrives: the xDS client ([`discovery`]), the staging of each
//! revision into one whole snapshot ([`stager`]), the last accepted snapshot on
//! disk ([`last_good`]) and the namespace subset this proxy asks for
//! ([`subset`]). What a snapshot compiles to is `crate::runtime`; that work
//! runs off the event loops, at a lower priority ([`background`]).

pub(crate) mod background;
pub(crate) mod control_plane_tls;
pub(crate) mod discovery;
pub(crate) mod last_good;
pub(crate) mod stager;
pub(crate) mod subset;
