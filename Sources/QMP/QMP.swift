// QMP module
