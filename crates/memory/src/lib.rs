//! livemig memory
