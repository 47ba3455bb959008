//! livemig compact
