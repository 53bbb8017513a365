from pyeff.cli import main

raise SystemExit(main())
