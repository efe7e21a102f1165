//! HTTP/1.1 wire pieces shared by Prism's own HTTP/1.1 code.

pub(crate) mod chunked;
