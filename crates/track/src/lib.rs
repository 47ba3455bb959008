//! livemig track
