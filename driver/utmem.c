// SPDX-License-Identifier: GPL-2.0
/*
 * utmem guest driver: QEMU's ivshmem-doorbell (1af4:1110) as /dev/utmem.
 *
 * BAR0 holds the ivshmem registers, BAR2 the shared region whose layout and
 * whose ioctl ABI are in include/utmem_device.h. User space maps BAR2, claims
 * a channel slot, rings the host's doorbell and waits for the host's
 * interrupts (an event counter).
 *
 * Removal with files still open: remove() marks the device gone, waits for
 * every file operation inside an SRCU read section to finish, zaps user
 * mappings and releases the hardware; the struct itself lives (kref) until
 * the last file is closed, and file operations then fail with -ENODEV.
 */
#include <linux/atomic.h>
#include <linux/bitops.h>
#include <linux/compat.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/poll.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/srcu.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/wait.h>

#include "utmem_device.h"

#ifndef PCI_IRQ_INTX
#define PCI_IRQ_INTX PCI_IRQ_LEGACY
#endif

#define UTMEM_MAX_DEVICES 16
#define UTMEM_WAIT_MAX_MS 60000u

struct utmem_dev {
	struct kref ref;
	struct pci_dev *pdev;
	void __iomem *regs;			/* BAR0 */
	struct utmem_device_header *hdr;	/* first page of BAR2, WB */
	phys_addr_t shm_start;			/* BAR2 */
	resource_size_t shm_len;
	int irq;
	bool intx;
	bool gone;				/* removed; see file comment */
	struct srcu_struct srcu;
	atomic64_t events;			/* interrupts so far */
	wait_queue_head_t wq;
	DECLARE_BITMAP(slots, UTMEM_DEVICE_MAX_SLOTS);
	struct mutex files_lock;		/* open/release/remove only */
	struct list_head files;
	int index;
	char name[16];
	struct miscdevice misc;
};

struct utmem_file {
	struct utmem_dev *ud;
	struct file *file;
	struct list_head node;
	atomic64_t seen;			/* events count last read() */
	int slot;				/* claimed slot or -1 */
};

static DEFINE_IDA(utmem_ida);

/* ---- region header (the host may rewrite it at any time) ---- */

static u32 utmem_rd32(const __u32 *p)
{
	return le32_to_cpu((__force __le32)READ_ONCE(*p));
}

static bool utmem_hdr_valid(struct utmem_dev *ud)
{
	return utmem_rd32(&ud->hdr->magic) == UTMEM_DEVICE_MAGIC &&
	       utmem_rd32(&ud->hdr->version) == UTMEM_DEVICE_VERSION;
}

static u32 utmem_state(struct utmem_dev *ud)
{
	/* acquire: header fields the host wrote before the state are visible */
	return le32_to_cpu((__force __le32)smp_load_acquire(&ud->hdr->state));
}

static bool utmem_serving(struct utmem_dev *ud)
{
	return utmem_state(ud) == UTMEM_DEVICE_STATE_SERVING &&
	       utmem_hdr_valid(ud);
}

static u32 utmem_slots(struct utmem_dev *ud)
{
	if (!utmem_hdr_valid(ud))
		return 0;
	return min_t(u32, utmem_rd32(&ud->hdr->slots), UTMEM_DEVICE_MAX_SLOTS);
}

/* ---- interrupts ---- */

static void utmem_event(struct utmem_dev *ud)
{
	atomic64_inc(&ud->events);
	wake_up_all(&ud->wq);
}

static irqreturn_t utmem_irq_msix(int irq, void *data)
{
	utmem_event(data);
	return IRQ_HANDLED;
}

static irqreturn_t utmem_irq_intx(int irq, void *data)
{
	struct utmem_dev *ud = data;
	u32 status = ioread32(ud->regs + UTMEM_REG_INTR_STATUS); /* clears it */

	if (!status || status == ~0u)
		return IRQ_NONE;
	utmem_event(ud);
	return IRQ_HANDLED;
}

/* ---- file operations ---- */

static void utmem_dev_free(struct kref *ref)
{
	struct utmem_dev *ud = container_of(ref, struct utmem_dev, ref);

	cleanup_srcu_struct(&ud->srcu);
	kfree(ud);
}

static int utmem_open(struct inode *inode, struct file *file)
{
	/* misc_open() set private_data and holds misc_mtx: no race with remove */
	struct utmem_dev *ud = container_of(file->private_data,
					    struct utmem_dev, misc);
	struct utmem_file *uf;

	uf = kzalloc(sizeof(*uf), GFP_KERNEL);
	if (!uf)
		return -ENOMEM;
	uf->ud = ud;
	uf->file = file;
	uf->slot = -1;
	atomic64_set(&uf->seen, atomic64_read(&ud->events));
	kref_get(&ud->ref);
	mutex_lock(&ud->files_lock);
	list_add(&uf->node, &ud->files);
	mutex_unlock(&ud->files_lock);
	file->private_data = uf;
	return nonseekable_open(inode, file);
}

static int utmem_release(struct inode *inode, struct file *file)
{
	struct utmem_file *uf = file->private_data;
	struct utmem_dev *ud = uf->ud;

	if (READ_ONCE(uf->slot) >= 0)
		clear_bit_unlock(uf->slot, ud->slots);
	mutex_lock(&ud->files_lock);
	list_del(&uf->node);
	mutex_unlock(&ud->files_lock);
	kfree(uf);
	kref_put(&ud->ref, utmem_dev_free);
	return 0;
}

static ssize_t utmem_read(struct file *file, char __user *buf, size_t count,
			  loff_t *ppos)
{
	struct utmem_file *uf = file->private_data;
	struct utmem_dev *ud = uf->ud;
	u64 ev;

	if (count < sizeof(ev))
		return -EINVAL;
	if (READ_ONCE(ud->gone))
		return -ENODEV;
	ev = atomic64_read(&ud->events);
	if (copy_to_user(buf, &ev, sizeof(ev)))
		return -EFAULT;
	atomic64_set(&uf->seen, ev);
	return sizeof(ev);
}

static __poll_t utmem_poll(struct file *file, poll_table *wait)
{
	struct utmem_file *uf = file->private_data;
	struct utmem_dev *ud = uf->ud;
	__poll_t mask = 0;
	int idx;

	poll_wait(file, &ud->wq, wait);
	idx = srcu_read_lock(&ud->srcu);
	if (READ_ONCE(ud->gone)) {
		mask = EPOLLHUP | EPOLLERR;
	} else {
		if (atomic64_read(&ud->events) != atomic64_read(&uf->seen))
			mask |= EPOLLIN | EPOLLRDNORM;
		if (!utmem_serving(ud))
			mask |= EPOLLHUP | EPOLLERR;
	}
	srcu_read_unlock(&ud->srcu, idx);
	return mask;
}

static const struct vm_operations_struct utmem_vm_ops = {
	/* no .fault: a zapped mapping (device removed) gets SIGBUS */
#ifdef CONFIG_HAVE_IOREMAP_PROT
	.access = generic_access_phys,
#endif
};

static int utmem_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct utmem_file *uf = file->private_data;
	struct utmem_dev *ud = uf->ud;
	int idx, ret;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	idx = srcu_read_lock(&ud->srcu);
	if (READ_ONCE(ud->gone)) {
		ret = -ENODEV;
		goto out;
	}
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, VM_DONTEXPAND | VM_DONTDUMP);
#else
	vma->vm_flags |= VM_DONTEXPAND | VM_DONTDUMP;
#endif
	vma->vm_ops = &utmem_vm_ops;
	/*
	 * Checks that pgoff and length lie inside BAR2. Keeps vm_page_prot
	 * (write-back): the BAR is RAM on the host side, and PAT records the
	 * range as WB, matching the kernel's memremap() of the header.
	 */
	ret = vm_iomap_memory(vma, ud->shm_start, ud->shm_len);
out:
	srcu_read_unlock(&ud->srcu, idx);
	return ret;
}

static long utmem_ioc_info(struct utmem_dev *ud, void __user *arg)
{
	struct utmem_dev_info info = {};

	info.region_len = ud->shm_len;
	info.events = atomic64_read(&ud->events);
	info.state = utmem_state(ud);
	if (utmem_rd32(&ud->hdr->magic) == UTMEM_DEVICE_MAGIC)
		info.version = utmem_rd32(&ud->hdr->version);
	info.slots = utmem_slots(ud);
	info.peer_id = ioread32(ud->regs + UTMEM_REG_IV_POSITION);
	return copy_to_user(arg, &info, sizeof(info)) ? -EFAULT : 0;
}

static long utmem_ioc_kick(struct utmem_dev *ud)
{
	if (!utmem_serving(ud))
		return -ENOTCONN;
	iowrite32(UTMEM_HOST_PEER << 16 | 0, ud->regs + UTMEM_REG_DOORBELL);
	return 0;
}

static long utmem_ioc_wait(struct utmem_dev *ud, void __user *arg)
{
	struct utmem_dev_wait w;
	long ret = 0;
	u64 now;

	if (copy_from_user(&w, arg, sizeof(w)))
		return -EFAULT;
	if (w.reserved || w.timeout_ms > UTMEM_WAIT_MAX_MS)
		return -EINVAL;
	if (!utmem_serving(ud))
		return -ENOTCONN;
	if (w.timeout_ms && atomic64_read(&ud->events) == w.seen) {
		ret = wait_event_interruptible_timeout(ud->wq,
				atomic64_read(&ud->events) != w.seen ||
				READ_ONCE(ud->gone) || !utmem_serving(ud),
				msecs_to_jiffies(w.timeout_ms));
		if (ret < 0)
			return ret;	/* -ERESTARTSYS */
	}
	if (READ_ONCE(ud->gone))
		return -ENODEV;
	now = atomic64_read(&ud->events);
	if (now != w.seen)
		ret = 0;
	else if (!utmem_serving(ud))
		ret = -ENOTCONN;
	else
		ret = -ETIMEDOUT;
	w.seen = now;
	if (copy_to_user(arg, &w, sizeof(w)))
		return -EFAULT;
	return ret;
}

static long utmem_ioc_claim(struct utmem_file *uf, u32 __user *arg)
{
	struct utmem_dev *ud = uf->ud;
	int slot, old;
	u32 i, n;

	if (!utmem_serving(ud))
		return -ENOTCONN;
	slot = READ_ONCE(uf->slot);
	if (slot < 0) {
		n = utmem_slots(ud);
		for (i = 0; i < n; i++)
			if (!test_and_set_bit_lock(i, ud->slots))
				break;
		if (i >= n)
			return -ENOSPC;
		/* two threads claiming on one file: the first one wins */
		old = cmpxchg(&uf->slot, -1, (int)i);
		if (old >= 0) {
			clear_bit_unlock(i, ud->slots);
			slot = old;
		} else {
			slot = i;
		}
	}
	return put_user((u32)slot, arg);
}

static long utmem_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct utmem_file *uf = file->private_data;
	struct utmem_dev *ud = uf->ud;
	void __user *argp = (void __user *)arg;
	long ret;
	int idx;

	switch (cmd) {
	case UTMEM_IOC_INFO:
	case UTMEM_IOC_KICK:
	case UTMEM_IOC_WAIT:
	case UTMEM_IOC_CLAIM:
		break;
	default:
		return -ENOTTY;
	}

	idx = srcu_read_lock(&ud->srcu);
	if (READ_ONCE(ud->gone)) {
		ret = -ENODEV;
		goto out;
	}
	switch (cmd) {
	case UTMEM_IOC_INFO:
		ret = utmem_ioc_info(ud, argp);
		break;
	case UTMEM_IOC_KICK:
		ret = utmem_ioc_kick(ud);
		break;
	case UTMEM_IOC_WAIT:
		ret = utmem_ioc_wait(ud, argp);
		break;
	default:
		ret = utmem_ioc_claim(uf, argp);
		break;
	}
out:
	srcu_read_unlock(&ud->srcu, idx);
	return ret;
}

static const struct file_operations utmem_fops = {
	.owner		= THIS_MODULE,
	.open		= utmem_open,
	.release	= utmem_release,
	.read		= utmem_read,
	.poll		= utmem_poll,
	.mmap		= utmem_mmap,
	.unlocked_ioctl	= utmem_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
};

/* ---- PCI ---- */

static int utmem_setup_irq(struct utmem_dev *ud)
{
	struct pci_dev *pdev = ud->pdev;
	int ret;

	ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX);
	if (ret < 0) {
		ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_INTX);
		if (ret < 0)
			return ret;
		ud->intx = true;
	}
	ud->irq = pci_irq_vector(pdev, 0);
	ret = request_irq(ud->irq, ud->intx ? utmem_irq_intx : utmem_irq_msix,
			  ud->intx ? IRQF_SHARED : 0, ud->name, ud);
	if (ret) {
		pci_free_irq_vectors(pdev);
		return ret;
	}
	if (ud->intx)
		iowrite32(1, ud->regs + UTMEM_REG_INTR_MASK);
	return 0;
}

static int utmem_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct utmem_dev *ud;
	int ret;

	ud = kzalloc(sizeof(*ud), GFP_KERNEL);
	if (!ud)
		return -ENOMEM;
	kref_init(&ud->ref);
	ud->pdev = pdev;
	init_waitqueue_head(&ud->wq);
	mutex_init(&ud->files_lock);
	INIT_LIST_HEAD(&ud->files);
	ret = init_srcu_struct(&ud->srcu);
	if (ret) {
		kfree(ud);
		return ret;
	}

	ret = ida_alloc_max(&utmem_ida, UTMEM_MAX_DEVICES - 1, GFP_KERNEL);
	if (ret < 0) {
		dev_warn(&pdev->dev, "too many utmem devices\n");
		ret = -EBUSY;
		goto err_put;
	}
	ud->index = ret;
	if (ud->index)
		snprintf(ud->name, sizeof(ud->name), "utmem%d", ud->index);
	else
		strscpy(ud->name, "utmem", sizeof(ud->name));

	ret = pci_enable_device(pdev);
	if (ret)
		goto err_ida;
	ret = pci_request_regions(pdev, KBUILD_MODNAME);
	if (ret)
		goto err_disable;
	pci_set_master(pdev);	/* MSI-X writes are bus-master DMA */

	if (!(pci_resource_flags(pdev, 2) & IORESOURCE_MEM) ||
	    pci_resource_len(pdev, 2) < UTMEM_DEVICE_HEADER_LEN ||
	    pci_resource_len(pdev, 0) < UTMEM_REG_DOORBELL + 4) {
		dev_err(&pdev->dev, "unexpected BARs\n");
		ret = -ENODEV;
		goto err_regions;
	}
	ud->shm_start = pci_resource_start(pdev, 2);
	ud->shm_len = pci_resource_len(pdev, 2);
	ud->regs = pci_iomap(pdev, 0, 0);
	if (!ud->regs) {
		ret = -ENOMEM;
		goto err_regions;
	}
	/* cacheable, like user space's mappings of the same range */
	ud->hdr = memremap(ud->shm_start, PAGE_SIZE, MEMREMAP_WB);
	if (!ud->hdr) {
		ret = -ENOMEM;
		goto err_iounmap;
	}

	ret = utmem_setup_irq(ud);
	if (ret)
		goto err_memunmap;

	ud->misc.minor = MISC_DYNAMIC_MINOR;
	ud->misc.name = ud->name;
	ud->misc.fops = &utmem_fops;
	ud->misc.parent = &pdev->dev;
	ret = misc_register(&ud->misc);
	if (ret)
		goto err_irq;

	pci_set_drvdata(pdev, ud);
	dev_info(&pdev->dev,
		 "/dev/%s: region %llu KiB, %s, peer %d, header %s, state %u\n",
		 ud->name, (u64)ud->shm_len >> 10, ud->intx ? "INTx" : "MSI-X",
		 ioread32(ud->regs + UTMEM_REG_IV_POSITION),
		 utmem_hdr_valid(ud) ? "valid" : "not set up", utmem_state(ud));
	return 0;

err_irq:
	free_irq(ud->irq, ud);
	pci_free_irq_vectors(pdev);
err_memunmap:
	memunmap(ud->hdr);
err_iounmap:
	pci_iounmap(pdev, ud->regs);
err_regions:
	pci_release_regions(pdev);
err_disable:
	pci_disable_device(pdev);
err_ida:
	ida_free(&utmem_ida, ud->index);
err_put:
	kref_put(&ud->ref, utmem_dev_free);
	return ret;
}

static void utmem_remove(struct pci_dev *pdev)
{
	struct utmem_dev *ud = pci_get_drvdata(pdev);
	struct address_space *last = NULL;
	struct utmem_file *uf;

	misc_deregister(&ud->misc);	/* no new opens */
	if (ud->intx)
		iowrite32(0, ud->regs + UTMEM_REG_INTR_MASK);
	free_irq(ud->irq, ud);
	pci_free_irq_vectors(pdev);

	WRITE_ONCE(ud->gone, true);
	wake_up_all(&ud->wq);
	synchronize_srcu(&ud->srcu);	/* file ops see gone from here on */

	/*
	 * Open files' mappings of BAR2 would outlive the BAR: zap them (later
	 * faults get SIGBUS). An mmap() racing with this may keep its pages.
	 */
	mutex_lock(&ud->files_lock);
	list_for_each_entry(uf, &ud->files, node) {
		if (uf->file->f_mapping != last)
			unmap_mapping_range(uf->file->f_mapping, 0, 0, 1);
		last = uf->file->f_mapping;
	}
	mutex_unlock(&ud->files_lock);

	memunmap(ud->hdr);
	pci_iounmap(pdev, ud->regs);
	pci_release_regions(pdev);
	pci_disable_device(pdev);
	ida_free(&utmem_ida, ud->index);
	kref_put(&ud->ref, utmem_dev_free);
}

static const struct pci_device_id utmem_pci_ids[] = {
	{ PCI_DEVICE(UTMEM_PCI_VENDOR, UTMEM_PCI_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, utmem_pci_ids);

static struct pci_driver utmem_pci_driver = {
	.name		= "utmem",
	.id_table	= utmem_pci_ids,
	.probe		= utmem_probe,
	.remove		= utmem_remove,
};
module_pci_driver(utmem_pci_driver);

MODULE_DESCRIPTION("utmem guest device (ivshmem-doorbell)");
MODULE_LICENSE("GPL");
