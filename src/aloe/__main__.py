from aloe.cli import main

raise SystemExit(main())
