-- Run by the postgres image at first start (after 01-install.sql): the VCS preset.
\ir /sql/vcs/install.sql
