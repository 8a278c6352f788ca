/* Nothing to import: the shim only interposes symbols. */
