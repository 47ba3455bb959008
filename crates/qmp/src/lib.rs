//! livemig qmp
