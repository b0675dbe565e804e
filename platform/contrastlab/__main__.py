from contrastlab.cli import main

raise SystemExit(main())
