//! livemig agent
